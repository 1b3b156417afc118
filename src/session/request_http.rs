//! The OpenAI HTTP side of a request on its shard: starting it from a parsed body, and its end
//! (SSE end, the Responses closing events, or the one JSON body). Per-token text goes through `request::emit_text` like every
//! other sink's.

use std::rc::Rc;
use std::time::Instant;

use super::journal;
use super::json::quoted;
use super::protocol::{GenerateMsg, ProtocolError};
use super::request::{check_context, journal_for, submit, Logged, ReqEntry, Sink};
use crate::engine::{FinishReason, SeqKey};
use crate::http::openai::OpenAiError;
use crate::http::responses::{self, End, HttpKind, HttpMeta, ResponsesRequest, ResponsesView};
use crate::http::sse::{self, SseMeta};
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::ws::handshake::StreamMode;

/// A request answered over HTTP: SSE when `stream`, else one JSON body at the end.
pub struct HttpSink {
    pub meta: SseMeta,
    pub stream: bool,
    pub include_usage: bool,
    /// The `200` and the opening event(s) went out.
    pub started: bool,
    /// Last bytes written (SSE keep-alive comments after a silence).
    pub last_write: Instant,
    /// A Responses API response: its events and object instead of chat chunks.
    pub responses: Option<Box<ResponsesView>>,
}

/// Silence after which a streaming HTTP response gets a `: keep-alive` comment.
pub const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Ends the response of a request whose client is there: the error, the SSE end (finish
/// chunk, usage, `[DONE]`, or the Responses closing events) or the JSON body.
pub(super) fn finish_http(
    shard: &Shard,
    e: &ReqEntry,
    reason: FinishReason,
    logprobs: Option<serde_json::Value>,
) {
    let Sink::Http(h) = &e.sink else {
        return;
    };
    let mut out = e.conn.out.borrow_mut();
    if let Some(rv) = h.responses.as_deref() {
        let end = End {
            finish_reason: reason.as_str().into(),
            prompt_tokens: u64::from(e.prompt_tokens),
            completion_tokens: u64::from(e.tokens),
            error: (reason == FinishReason::Error)
                .then(|| ("internal_error".into(), "generation failed".into())),
        };
        if h.stream {
            if !h.started {
                sse::write_stream_head(&mut out.buf);
                rv.prelude(&mut out.buf);
            }
            rv.end(&mut out.buf, e.seq + 1, &end);
            sse::write_last_chunk(&mut out.buf);
        } else {
            responses::write_json(&mut out.buf, &rv.object(end.status(), Some(&end), true));
        }
        drop(out);
        shard.mark_dirty(&e.conn);
        return;
    }
    // OpenAI has no "cancelled"; a cancelled HTTP request has no reader anyway.
    let finish = if reason == FinishReason::Length {
        "length"
    } else {
        "stop"
    };
    let u = sse::usage(e.prompt_tokens, e.tokens);
    if reason == FinishReason::Error {
        if h.stream && h.started {
            sse::write_stream_error(&mut out.buf, "internal_error", "generation failed");
        } else {
            crate::http::response::write_json_error(
                &mut out.buf,
                500,
                "internal_error",
                "generation failed",
                None,
                false,
            );
        }
    } else if h.stream {
        if !h.started {
            sse::write_stream_head(&mut out.buf);
            sse::write_text_event(&mut out.buf, &h.meta, 0, "", true, None);
        }
        let usage = h.include_usage.then_some(u);
        sse::write_stream_end(&mut out.buf, &h.meta, e.seq + 1, finish, usage, logprobs);
    } else {
        sse::write_json_response(
            &mut out.buf,
            &h.meta,
            &e.chunker.pending,
            finish,
            u,
            logprobs,
        );
    }
    drop(out);
    shard.mark_dirty(&e.conn);
}

/// Who sent an HTTP request: its tenant (by key) and the key, whose hash guards what it
/// logged (only the same key reads a response back).
#[derive(Clone)]
pub struct Caller {
    pub tenant: Option<std::sync::Arc<crate::ws::Tenant>>,
    pub token_hash: [u8; 32],
}

impl Caller {
    pub fn new(tenant: Option<std::sync::Arc<crate::ws::Tenant>>, key: Option<&[u8]>) -> Self {
        Caller {
            tenant,
            token_hash: crate::store::token_hash_of(key.unwrap_or_default()),
        }
    }
}

fn clear_id(mut e: ProtocolError) -> ProtocolError {
    e.id = None;
    e
}

/// Checks and submits an HTTP generation; with `logged`, its log is started too (`detached`:
/// it has no client from the start, a background response answered at once).
pub(crate) fn launch(
    shard: &Shard,
    conn: &Rc<Conn>,
    g: GenerateMsg,
    sink: HttpSink,
    caller: Caller,
    logged: Option<HttpMeta>,
    detached: bool,
) -> Result<SeqKey, OpenAiError> {
    let shared = &shard.shared;
    if shard.draining.get() {
        return Err(
            ProtocolError::new(None, "shutting_down", "the server is shutting down").into(),
        );
    }
    if let Some(m) = &g.model {
        if !shared.models.contains(m) {
            return Err(ProtocolError::new(
                None,
                "model_not_found",
                format!("The model `{m}` does not exist"),
            )
            .into());
        }
    }
    let t = caller.tenant.as_ref();
    let model = g
        .model
        .as_deref()
        .or_else(|| shared.models.first().map(String::as_str))
        .unwrap_or_default();
    if let Some(t) = t.filter(|t| !t.allows_model(model)) {
        return Err(OpenAiError {
            status: 403,
            code: "model_not_allowed",
            message: format!("tenant {:?} may not use model `{model}`", t.id),
            param: Some("model"),
            retry_after: None,
        });
    }
    let prompt = shared.codec.encode(&g.input)?;
    check_context(shard, &g, prompt.len()).map_err(clear_id)?;
    let mut entry = ReqEntry::new(
        shard,
        conn,
        &g,
        StreamMode::Token,
        prompt.len(),
        Sink::Http(sink),
    );
    let max_tokens = g
        .params
        .max_tokens
        .unwrap_or(shared.config.session.default_max_tokens);
    entry
        .charge_tenant(caller.tenant.clone(), max_tokens)
        .map_err(clear_id)?;
    let mut params = g.params.clone();
    let mut start = None;
    if let Some(meta) = logged {
        let id = meta.id.clone();
        let l = Logged {
            session: &id,
            id: &id,
            token_hash: caller.token_hash,
            mode: StreamMode::Token,
            prompt: &prompt,
            stop: &g.stop,
            http: Some(meta),
        };
        let Some((mut j, s)) = journal_for(shard, l, &mut params) else {
            return Err(OpenAiError {
                status: 400,
                code: "not_resumable",
                message: "resume is off on this server (--resume false): nothing is stored".into(),
                param: None,
                retry_after: None,
            });
        };
        if detached {
            j.detached = Some(Instant::now());
        }
        entry.journal = Some(j);
        start = Some(s);
    }
    let key = submit(shard, entry, prompt, params).map_err(clear_id)?;
    if let Some(mut s) = start {
        // A detached generation's client is answered once its log is in the store.
        s.ack = detached.then_some(key);
        journal::start(shard, s);
    }
    Ok(key)
}

fn created_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts a generation for a chat or completions request; the connection's reader waits
/// until `conn.http_busy` clears before it reads the next request.
pub fn start_http(
    shard: &Shard,
    conn: &Rc<Conn>,
    req: crate::http::openai::OpenAiRequest,
    caller: Caller,
) -> Result<(), OpenAiError> {
    let shared = &shard.shared;
    let g = req.gen;
    let model = g
        .model
        .clone()
        .unwrap_or_else(|| shared.models.first().cloned().unwrap_or_default());
    let created = created_now();
    let meta = SseMeta {
        endpoint: req.endpoint,
        id_json: quoted(&g.id).into_boxed_str(),
        model_json: quoted(&model).into_boxed_str(),
        created,
    };
    let logged = req.resumable.then(|| HttpMeta {
        kind: HttpKind::Chat,
        id: g.id.clone(),
        created,
        model: model.clone(),
        background: false,
        instructions: None,
        metadata: serde_json::Value::Null,
        temperature: None,
        top_p: None,
        max_output_tokens: None,
        previous_response_id: None,
        conversation: Vec::new(),
        include_usage: req.include_usage,
    });
    let sink = HttpSink {
        meta,
        stream: req.stream,
        include_usage: req.include_usage,
        started: false,
        last_write: Instant::now(),
        responses: None,
    };
    let key = launch(shard, conn, g, sink, caller, logged, false)?;
    conn.http_busy.set(Some(key));
    Ok(())
}

/// Starts a response (`POST /v1/responses`) whose conversation is complete (`earlier`: the
/// previous response's, with its answer). A background response that is not streamed is
/// answered at once; the others hold the connection like a chat request.
pub fn start_response(
    shard: &Shard,
    conn: &Rc<Conn>,
    mut rr: ResponsesRequest,
    earlier: Vec<(String, String)>,
    caller: Caller,
) -> Result<(), OpenAiError> {
    let shared = &shard.shared;
    if !earlier.is_empty() {
        rr.gen = responses::generation(
            &rr.meta,
            &earlier,
            &rr.input,
            rr.meta.id.clone(),
            &shared.config.session,
        )?;
    }
    let mut conversation = earlier;
    conversation.extend(rr.input.iter().cloned());
    rr.meta.conversation = conversation;
    let background = rr.meta.background;
    let meta = Box::new(rr.meta);
    let sink = HttpSink {
        meta: SseMeta {
            endpoint: crate::http::openai::Endpoint::Chat,
            id_json: quoted(&meta.id).into_boxed_str(),
            model_json: quoted(&meta.model).into_boxed_str(),
            created: meta.created,
        },
        stream: rr.stream,
        include_usage: false,
        started: false,
        last_write: Instant::now(),
        responses: Some(Box::new(ResponsesView::new(meta.clone(), None))),
    };
    let logged = rr.store.then(|| (*meta).clone());
    let answer_now = background && !rr.stream;
    let key = launch(shard, conn, rr.gen, sink, caller, logged, answer_now)?;
    if answer_now {
        conn.http_stored.set(true);
        shard
            .journal
            .stored_answers
            .borrow_mut()
            .push(StoredAnswer {
                key,
                conn: conn.clone(),
                meta,
            });
    } else {
        conn.http_busy.set(Some(key));
    }
    Ok(())
}

/// A background response's `queued` answer, held until the store has its log: the id the
/// client gets is then readable (and resumable) on every instance sharing the store.
pub struct StoredAnswer {
    key: SeqKey,
    conn: Rc<Conn>,
    meta: Box<HttpMeta>,
}

/// The store wrote (`ok`) or failed to write the log of `key`'s generation: answers the
/// response that waited for it. Unstored, the response is refused and its generation
/// cancelled (nobody could ever read it).
pub fn on_stored(shard: &Shard, key: SeqKey, ok: bool) {
    let answer = {
        let mut waiting = shard.journal.stored_answers.borrow_mut();
        let Some(i) = waiting.iter().position(|a| a.key == key) else {
            return;
        };
        waiting.swap_remove(i)
    };
    let StoredAnswer { conn, meta, .. } = answer;
    if !ok {
        shard.send_control(crate::engine::EngineMsg::Cancel(key));
    }
    conn.http_stored.set(false);
    conn.response_done.notify();
    if conn.is_closing() {
        return;
    }
    {
        let out = &mut conn.out.borrow_mut().buf;
        if ok {
            let rv = ResponsesView::new(meta, None);
            responses::write_json(out, &rv.object("queued", None, false));
        } else {
            let e = OpenAiError {
                status: 503,
                code: "store_unavailable",
                message: "the response could not be stored; retry".into(),
                param: None,
                retry_after: Some(1),
            };
            super::resume_http::write_error(out, &e);
        }
    }
    conn.wake_writer.notify();
}
