//! The HTTP views of a logged generation: a response read back (`GET /v1/responses/{id}`),
//! its stream picked up again (`?stream=true&starting_after=N`), a resumable chat stream
//! reattached with `Last-Event-ID`, cancel and delete. Each is a follow (or one read) of the
//! log through the state thread, like the WebSocket `resume`, rendered as SSE events or a
//! JSON object on the connection that asked; so it works on any instance sharing the store,
//! and the state thread claims a generation whose owner is gone for the shard that reads it.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::journal::StoredRequest;
use super::resume::Follower;
use crate::http::openai::OpenAiError;
use crate::http::response::{error_body, write_response};
use crate::http::responses::{self, End, HttpKind, HttpMeta, ResponsesRequest, ResponsesView};
use crate::http::sse::{self, SseMeta};
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::store::thread::{Refusal, Snapshot, StoreOp, Who};

use super::request_http::Caller;

/// What an HTTP follower asked for.
#[derive(Clone, Copy, Debug)]
pub enum Want {
    /// Responses events after `after` (all of them: `None`) as SSE, or (`stream: false`)
    /// the Response object once it ended (the answer to a cancel).
    Responses { after: Option<u64>, stream: bool },
    /// Chat chunks after event id `after`.
    Chat { after: u64 },
}

/// An HTTP follower's state on its shard.
pub struct HttpFollow {
    pub want: Want,
    view: Option<View>,
    started: bool,
    /// A cancel waits for the end: a generation this shard takes over is cancelled at once.
    pub cancel_on_adopt: bool,
}

enum View {
    Responses(ResponsesView),
    Chat(SseMeta, bool),
}

/// A read of a whole log that a connection waits for.
pub struct PendingRead {
    pub conn: Rc<Conn>,
    pub id: String,
    pub purpose: Purpose,
}

pub enum Purpose {
    /// `GET /v1/responses/{id}`.
    Retrieve,
    /// The response named by `previous_response_id`, for a new one that continues it.
    Previous(Box<ResponsesRequest>, Caller),
    /// `DELETE /v1/responses/{id}`.
    Delete,
}

fn not_found(id: &str) -> OpenAiError {
    OpenAiError {
        status: 404,
        code: "not_found",
        message: format!(
            "No response or stream with id '{id}' found (unknown, expired, or another key's)."
        ),
        param: None,
        retry_after: None,
    }
}

/// The HTTP error for a refused read or follow. A known id under another key is as unknown as
/// one that never existed.
fn refusal_error(id: &str, why: &Refusal) -> OpenAiError {
    let (status, code) = match why.0 {
        "unknown_session" | "unknown_id" | "bad_token" => return not_found(id),
        "store_unavailable" => (503, "store_unavailable"),
        "bad_offset" => (400, "bad_offset"),
        "already_finished" => (409, "already_finished"),
        _ => (409, "not_resumable"),
    };
    OpenAiError {
        status,
        code,
        message: why.1.clone(),
        param: None,
        retry_after: None,
    }
}

/// Writes an OpenAI error as the whole answer.
pub fn write_error(out: &mut BytesMut, e: &OpenAiError) {
    let body = error_body(e.code, &e.message, e.param);
    let retry = e.retry_after.map(|s| s.to_string());
    let headers: Vec<(&str, &str)> = match &retry {
        Some(r) => vec![("retry-after", r.as_str())],
        None => Vec::new(),
    };
    write_response(out, e.status, "application/json", &headers, &body, false);
}

/// Queues `op` for the state thread; a full queue is a 503 to retry.
fn send(
    shard: &Shard,
    store: &crate::store::thread::StoreHandle,
    op: StoreOp,
) -> Result<(), OpenAiError> {
    if store.send(shard.id, op) {
        return Ok(());
    }
    shard.metrics.store_drops.inc();
    Err(OpenAiError {
        status: 503,
        code: "store_unavailable",
        message: "the state queue is full; retry".into(),
        param: None,
        retry_after: Some(1),
    })
}

fn store_off() -> OpenAiError {
    OpenAiError {
        status: 404,
        code: "not_found",
        message: "nothing is stored on this server (--resume false)".into(),
        param: None,
        retry_after: None,
    }
}

/// Follows the log of `id` (a response or a resumable chat stream) for this connection.
pub fn follow(
    shard: &Shard,
    conn: &Rc<Conn>,
    id: &str,
    token_hash: [u8; 32],
    want: Want,
    cancel_on_adopt: bool,
) -> Result<(), OpenAiError> {
    let store = shard.shared.store.as_ref().ok_or_else(store_off)?;
    let after = match want {
        // The closing events carry the whole text: read from the start, send what is wanted.
        Want::Responses { .. } => 0,
        Want::Chat { after } => after,
    };
    let ticket = shard.journal.ticket(shard.id);
    let op = StoreOp::Follow {
        who: Who {
            shard: shard.id,
            ticket,
            session: id.into(),
            id: id.into(),
            token_hash,
        },
        after,
        with_request: true,
        backlogged: conn.backlogged.clone(),
    };
    send(shard, store, op)?;
    let http = HttpFollow {
        want,
        view: None,
        started: false,
        cancel_on_adopt,
    };
    let gen = crate::store::gen_id(id, id);
    shard
        .journal
        .followers
        .borrow_mut()
        .insert(ticket, Follower::new(conn, id, gen, Some(Box::new(http))));
    conn.http_follow.set(Some(ticket));
    Ok(())
}

/// Asks the store for the whole log of `id` (a read, a delete).
pub fn read(
    shard: &Shard,
    conn: &Rc<Conn>,
    id: &str,
    token_hash: [u8; 32],
    purpose: Purpose,
) -> Result<(), OpenAiError> {
    let store = shard.shared.store.as_ref().ok_or_else(store_off)?;
    let ticket = shard.journal.ticket(shard.id);
    let who = Who {
        shard: shard.id,
        ticket,
        session: id.into(),
        id: id.into(),
        token_hash,
    };
    let op = match purpose {
        Purpose::Delete => StoreOp::Delete(who),
        _ => StoreOp::Read(who),
    };
    send(shard, store, op)?;
    shard.journal.reads.borrow_mut().insert(
        ticket,
        PendingRead {
            conn: conn.clone(),
            id: id.to_owned(),
            purpose,
        },
    );
    conn.http_follow.set(Some(ticket));
    Ok(())
}

/// The connection waiting on `ticket` closed.
pub fn forget(shard: &Shard, ticket: u64) {
    shard.journal.reads.borrow_mut().remove(&ticket);
    if shard
        .journal
        .followers
        .borrow_mut()
        .remove(&ticket)
        .is_some()
    {
        if let Some(store) = shard.shared.store.as_ref() {
            if !store.send(shard.id, StoreOp::Unfollow(ticket)) {
                shard.metrics.store_drops.inc();
            }
        }
    }
}

/// The response to `ticket` is complete: the connection reads its next request.
fn release(conn: &Conn, ticket: u64) {
    if conn.http_follow.get() == Some(ticket) {
        conn.http_follow.set(None);
        conn.response_done.notify();
    }
}

fn meta_of(request: &[u8]) -> Option<HttpMeta> {
    serde_json::from_slice::<StoredRequest>(request).ok()?.http
}

/// Messages for an HTTP follower. Returns true when its answer is complete.
pub fn on_msgs(
    shard: &Shard,
    f: &mut Follower,
    ticket: u64,
    first_seq: u64,
    msgs: &[Bytes],
    done: bool,
    request: Option<Bytes>,
) -> bool {
    let Some(h) = f.http.as_deref_mut() else {
        return false;
    };
    let conn = f.conn.clone();
    let mut out = conn.out.borrow_mut();
    if let Some(r) = request {
        let view = meta_of(&r).and_then(|m| match (h.want, m.kind) {
            (Want::Responses { after, .. }, HttpKind::Response) => {
                Some(View::Responses(ResponsesView::new(Box::new(m), after)))
            }
            (Want::Chat { .. }, HttpKind::Chat) => {
                let meta = SseMeta {
                    endpoint: crate::http::openai::Endpoint::Chat,
                    id_json: super::json::quoted(&m.id).into_boxed_str(),
                    model_json: super::json::quoted(&m.model).into_boxed_str(),
                    created: m.created,
                };
                Some(View::Chat(meta, m.include_usage))
            }
            _ => None,
        });
        let Some(view) = view else {
            // A generation of another kind (a WebSocket one): not this route's.
            write_error(&mut out.buf, &not_found(&f.id));
            drop(out);
            shard.mark_dirty(&conn);
            release(&conn, ticket);
            return true;
        };
        h.view = Some(view);
    }
    let Some(view) = h.view.as_mut() else {
        return false;
    };
    let stream = !matches!(h.want, Want::Responses { stream: false, .. });
    if !h.started && stream {
        sse::write_stream_head(&mut out.buf);
        match view {
            View::Responses(rv) => rv.prelude(&mut out.buf),
            View::Chat(meta, _) => {
                if first_seq <= 1 {
                    sse::write_text_event(&mut out.buf, meta, 0, "", true, None);
                }
            }
        }
    }
    h.started = true;
    let mut ended = false;
    for (seq, m) in (first_seq..).zip(msgs) {
        match m.split_first() {
            Some((&super::journal::TEXT_DELTA, text)) => {
                let text = String::from_utf8_lossy(text);
                match view {
                    View::Responses(rv) if stream => rv.delta(&mut out.buf, seq, &text),
                    View::Responses(rv) => rv.text.push_str(&text),
                    View::Chat(meta, _) => {
                        sse::write_text_event(&mut out.buf, meta, seq, &text, false, None)
                    }
                }
            }
            _ => {
                let end = End::from_done(m).unwrap_or_else(|| End {
                    finish_reason: "error".into(),
                    ..End::default()
                });
                match view {
                    View::Responses(rv) if stream => {
                        rv.end(&mut out.buf, seq, &end);
                        sse::write_last_chunk(&mut out.buf);
                    }
                    View::Responses(rv) => {
                        let obj = rv.object(end.status(), Some(&end), true);
                        responses::write_json(&mut out.buf, &obj);
                    }
                    View::Chat(meta, include_usage) => {
                        if end.finish_reason == "error" {
                            let msg = end
                                .error
                                .map_or_else(|| "generation failed".to_owned(), |(_, m)| m);
                            sse::write_stream_error(&mut out.buf, "internal_error", &msg);
                        } else {
                            let finish = if end.finish_reason == "length" {
                                "length"
                            } else {
                                "stop"
                            };
                            let usage = include_usage.then(|| {
                                sse::usage(end.prompt_tokens as u32, end.completion_tokens as u32)
                            });
                            sse::write_stream_end(&mut out.buf, meta, seq, finish, usage, None);
                        }
                    }
                }
                ended = true;
                break;
            }
        }
    }
    drop(out);
    shard.mark_dirty(&conn);
    if ended || done {
        release(&conn, ticket);
        return true;
    }
    false
}

/// A refused or broken follow: the error as the answer, or as the stream's last event.
pub fn on_refused(shard: &Shard, f: &Follower, ticket: u64, why: &Refusal) {
    let Some(h) = f.http.as_deref() else {
        return;
    };
    let e = refusal_error(&f.id, why);
    let mut out = f.conn.out.borrow_mut();
    if h.started && !matches!(h.want, Want::Responses { stream: false, .. }) {
        match &h.view {
            Some(View::Responses(_)) => {
                let v = serde_json::json!({"type": "error", "code": e.code, "message": e.message,
                                           "param": null, "sequence_number": 0});
                sse::write_chunk(&mut out.buf, |o| {
                    o.extend_from_slice(b"event: error\ndata: ");
                    o.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_default());
                    o.extend_from_slice(b"\n\n");
                });
                sse::write_last_chunk(&mut out.buf);
            }
            _ => sse::write_stream_error(&mut out.buf, e.code, &e.message),
        }
    } else {
        write_error(&mut out.buf, &e);
    }
    drop(out);
    shard.mark_dirty(&f.conn);
    release(&f.conn, ticket);
}

/// The Response object of a whole log.
fn object_of(snap: &Snapshot) -> Option<(ResponsesView, Option<End>)> {
    let meta = meta_of(&snap.request).filter(|m| m.kind == HttpKind::Response)?;
    let mut rv = ResponsesView::new(Box::new(meta), None);
    let mut end = None;
    for m in &snap.msgs {
        match m.split_first() {
            Some((&super::journal::TEXT_DELTA, text)) => {
                rv.text.push_str(&String::from_utf8_lossy(text));
            }
            _ => end = End::from_done(m),
        }
    }
    Some((rv, end))
}

/// The answer to a read.
pub fn on_snapshot(shard: &Shard, ticket: u64, result: Result<Snapshot, Refusal>) {
    let Some(r) = shard.journal.reads.borrow_mut().remove(&ticket) else {
        return;
    };
    let conn = r.conn.clone();
    if conn.is_closing() {
        return;
    }
    let answer: Result<Option<serde_json::Value>, OpenAiError> = match (r.purpose, result) {
        (Purpose::Retrieve, Err(why)) => Err(refusal_error(&r.id, &why)),
        (Purpose::Previous(_, _), Err(why)) => {
            let mut e = refusal_error(&r.id, &why);
            if e.status == 404 {
                e.message = format!("Previous response with id '{}' not found.", r.id);
                e.status = 400;
                e.param = Some("previous_response_id");
            }
            Err(e)
        }
        (Purpose::Retrieve, Ok(snap)) => match object_of(&snap) {
            Some((rv, end)) => {
                let status = match &end {
                    Some(e) => e.status(),
                    None if snap.msgs.is_empty() => "queued",
                    None => "in_progress",
                };
                Ok(Some(rv.object(status, end.as_ref(), true)))
            }
            None => Err(not_found(&r.id)),
        },
        (Purpose::Previous(rr, caller), Ok(snap)) => match object_of(&snap) {
            Some((_, None)) => Err(OpenAiError {
                status: 400,
                code: "invalid_request_error",
                message: format!("Previous response with id '{}' is still in progress.", r.id),
                param: Some("previous_response_id"),
                retry_after: None,
            }),
            Some((rv, Some(_))) => {
                let mut earlier = rv.meta.conversation.clone();
                earlier.push(("assistant".into(), rv.text));
                match super::request_http::start_response(shard, &conn, *rr, earlier, caller) {
                    Ok(()) => {
                        // The new response holds the connection now (or was answered).
                        release(&conn, ticket);
                        conn.wake_writer.notify();
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            None => Err(OpenAiError {
                status: 400,
                ..not_found(&r.id)
            }),
        },
        (Purpose::Delete, _) => Ok(None),
    };
    {
        let mut out = conn.out.borrow_mut();
        match answer {
            Ok(Some(v)) => responses::write_json(&mut out.buf, &v),
            Ok(None) => {}
            Err(e) => write_error(&mut out.buf, &e),
        }
    }
    shard.mark_dirty(&conn);
    release(&conn, ticket);
}

/// The answer to a delete.
pub fn on_deleted(shard: &Shard, ticket: u64, result: Result<(), Refusal>) {
    let Some(r) = shard.journal.reads.borrow_mut().remove(&ticket) else {
        return;
    };
    {
        let mut out = r.conn.out.borrow_mut();
        match result {
            Ok(()) => responses::write_json(
                &mut out.buf,
                &serde_json::json!({"id": r.id, "object": "response", "deleted": true}),
            ),
            Err(why) => write_error(&mut out.buf, &refusal_error(&r.id, &why)),
        }
    }
    shard.mark_dirty(&r.conn);
    release(&r.conn, ticket);
}
