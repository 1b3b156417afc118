//! The HTTP/1.1 side of a connection: keep-alive and pipelined requests, head and body limits,
//! and the WebSocket upgrade (validated before any `101`).

use std::rc::Rc;
use std::time::Instant;

use bytes::{Buf, BytesMut};

use super::error::HttpError;
use super::openai;
use super::request::{parse_head, BodyKind, ChunkedDecoder, Head};
use super::responses;
use super::routes;
use crate::config::Mode;
use crate::server::conn::Conn;
use crate::server::io::ConnRead;
use crate::server::shard::Shard;
use crate::session::request_http::Caller;
use crate::ws::handshake::{self, Accepted, HandshakeContext, HandshakeRequest};

/// Bytes asked of the socket per read while a request head or body is incoming.
const READ_CHUNK: usize = 4096;

/// What the request head said, owned, so the body can be read into the same buffer.
pub struct RequestInfo {
    /// The API key presented (`Authorization: Bearer`, `?api_key=`), for tenants.
    pub api_key: Option<Vec<u8>>,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub keep_alive: bool,
    pub body: BodyKind,
    pub expect_continue: bool,
    /// `Last-Event-ID` (an SSE client reconnecting).
    pub last_event_id: Option<String>,
}

impl RequestInfo {
    fn from_head(h: &Head<'_>) -> Self {
        Self {
            api_key: crate::ws::tenant::request_key(&h.headers, h.query).map(|k| k.into_owned()),
            method: h.method.to_owned(),
            path: h.path.to_owned(),
            query: h.query.map(str::to_owned),
            keep_alive: h.keep_alive,
            body: h.body,
            expect_continue: h
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")),
            last_event_id: h
                .header("last-event-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned),
        }
    }
}

/// Serves requests until the connection closes (`None`) or upgrades to WebSocket.
pub async fn serve<R: ConnRead>(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    rd: &mut R,
    buf: &mut BytesMut,
) -> Option<Accepted> {
    let max_head = shard.shared.config.server.max_head_bytes;
    loop {
        if conn.is_closing() {
            return None;
        }
        let parsed = parse_head(buf, max_head);
        let info = match parsed {
            Err(e) => {
                fail(shard, conn, &e, true);
                return None;
            }
            Ok(None) => {
                if !buf.is_empty() && conn.head_started.get().is_none() {
                    conn.head_started.set(Some(Instant::now()));
                }
                match rd.read_more(buf, READ_CHUNK).await {
                    Ok(n) if n > 0 => continue,
                    _ => return None,
                }
            }
            Ok(Some(head)) => {
                conn.head_started.set(None);
                conn.last_active.set(Instant::now());
                shard.metrics.http_requests.inc();
                if routes::is_upgrade(shard, &head) {
                    let len = head.len;
                    if head.body != BodyKind::None {
                        fail(
                            shard,
                            conn,
                            &HttpError::BadRequest("an upgrade request carries no body".into()),
                            true,
                        );
                        return None;
                    }
                    let result = upgrade(shard, &head).and_then(|a| {
                        take_tenant_connection(conn, &a)?;
                        Ok(a)
                    });
                    return match result {
                        Ok(accepted) => {
                            buf.advance(len);
                            handshake::write_response_101(
                                &mut conn.out.borrow_mut().buf,
                                &accepted,
                            );
                            conn.wake_writer.notify();
                            Some(accepted)
                        }
                        Err(e) => {
                            shard.metrics.handshake_failure(e.label());
                            handshake::write_error_response(&mut conn.out.borrow_mut().buf, &e);
                            conn.close_after_flush(shard);
                            None
                        }
                    };
                }
                let info = RequestInfo::from_head(&head);
                buf.advance(head.len);
                info
            }
        };
        let body = match read_body(shard, conn, rd, buf, &info).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                fail(shard, conn, &e, false);
                return None;
            }
        };
        let api = if shard.shared.config.server.mode == Mode::Websocket {
            None
        } else if let Some(r) = responses::route(&info.method, &info.path) {
            Some(r.map_err(method_not_allowed).and_then(|r| {
                let caller = http_caller(shard, &info)?;
                responses_request(shard, conn, r, &info, &body, caller)
            }))
        } else {
            openai::Endpoint::from_path(&info.path)
                .map(|endpoint| openai_request(shard, conn, endpoint, &info, &body))
        };
        if let Some(result) = api {
            if let Err(e) = result {
                crate::session::resume_http::write_error(&mut conn.out.borrow_mut().buf, &e);
            }
            conn.wake_writer.notify();
            if !wait_response(conn, rd, buf).await {
                return None;
            }
            if !info.keep_alive {
                conn.close_after_flush(shard);
                return None;
            }
            continue;
        }
        let close = {
            let mut out = conn.out.borrow_mut();
            let close = routes::handle(shard, &info, &body, &mut out.buf);
            close || !info.keep_alive
        };
        conn.wake_writer.notify();
        if close {
            conn.close_after_flush(shard);
            return None;
        }
    }
}

/// A tenant's WebSocket connection takes one of its connection slots.
fn take_tenant_connection(
    conn: &Conn,
    accepted: &Accepted,
) -> Result<(), handshake::HandshakeError> {
    let Some(tenant) = accepted.tenant.as_ref() else {
        return Ok(());
    };
    match tenant.state.connect() {
        Ok(slot) => {
            *conn.tenant_slot.borrow_mut() = Some(slot);
            Ok(())
        }
        Err(why) => Err(handshake::HandshakeError::TenantLimit {
            message: why.message(&tenant.id),
            retry_after: why.retry_after_secs().unwrap_or(1),
        }),
    }
}

/// The tenant of an OpenAI request (by its key), or the 401 that says why there is none.
/// Authentication off: `None`.
fn http_tenant(
    shard: &Shard,
    info: &RequestInfo,
) -> Result<Option<std::sync::Arc<crate::ws::Tenant>>, openai::OpenAiError> {
    let tenants = shard.shared.tenants.current();
    if tenants.is_empty() {
        return Ok(None);
    }
    let found = info.api_key.as_deref().and_then(|k| tenants.find_by_key(k));
    match found {
        Some(t) => Ok(Some(t.clone())),
        None => Err(openai::OpenAiError {
            status: 401,
            code: "invalid_api_key",
            message: if info.api_key.is_some() {
                "Incorrect API key provided".into()
            } else {
                "You didn't provide an API key: send `Authorization: Bearer <key>`".into()
            },
            param: None,
            retry_after: None,
        }),
    }
}

fn openai_request(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    endpoint: openai::Endpoint,
    info: &RequestInfo,
    body: &[u8],
) -> Result<(), openai::OpenAiError> {
    if info.method != "POST" {
        return Err(openai::OpenAiError {
            status: 405,
            code: "method_not_allowed",
            message: format!("{} takes POST", info.path),
            param: None,
            retry_after: None,
        });
    }
    let caller = http_caller(shard, info)?;
    let id = format!("{}{}", endpoint.id_prefix(), random_hex());
    let req = openai::parse(endpoint, body, id, &shard.shared.config.session)?;
    crate::session::request_http::start_http(shard, conn, req, caller)
}

fn method_not_allowed(allow: &'static str) -> openai::OpenAiError {
    openai::OpenAiError {
        status: 405,
        code: "method_not_allowed",
        message: format!("this path takes {allow}"),
        param: None,
        retry_after: None,
    }
}

/// The tenant and key of an OpenAI request. HTTP connections take no `max_connections` slot:
/// behind a balancer they are its pooled upstream connections, shared by whichever clients it
/// sends down them; `max_concurrent_streams` bounds a tenant's HTTP work instead.
fn http_caller(shard: &Shard, info: &RequestInfo) -> Result<Caller, openai::OpenAiError> {
    let tenant = http_tenant(shard, info)?;
    Ok(Caller::new(tenant, info.api_key.as_deref()))
}

/// The Responses routes and the reattach of a resumable chat stream.
fn responses_request(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    route: responses::Route,
    info: &RequestInfo,
    body: &[u8],
    caller: Caller,
) -> Result<(), openai::OpenAiError> {
    use crate::session::resume_http::{self as rh, Purpose, Want};
    let bad_param = |param: &'static str, message: String| openai::OpenAiError {
        status: 400,
        code: "invalid_request_error",
        message,
        param: Some(param),
        retry_after: None,
    };
    let q = info.query.as_deref();
    match route {
        responses::Route::Create => {
            let id = format!("resp_{}", random_hex());
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let rr = responses::parse(body, id, created, &shard.shared.config.session)?;
            if rr.meta.previous_response_id.is_some() && shard.shared.store.is_none() {
                return Err(bad_param(
                    "previous_response_id",
                    "nothing is stored on this server (--resume false)".into(),
                ));
            }
            match rr.meta.previous_response_id.clone() {
                Some(prev) => rh::read(
                    shard,
                    conn,
                    &prev,
                    caller.token_hash,
                    Purpose::Previous(Box::new(rr), caller),
                ),
                None => crate::session::request_http::start_response(
                    shard,
                    conn,
                    rr,
                    Vec::new(),
                    caller,
                ),
            }
        }
        responses::Route::Get(id) => {
            let stream = match responses::query(q, "stream") {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => return Err(bad_param("stream", format!("stream={v}: true or false"))),
            };
            let after = match responses::query(q, "starting_after") {
                None => None,
                Some(v) => Some(v.parse::<u64>().map_err(|_| {
                    bad_param(
                        "starting_after",
                        format!("starting_after={v}: a sequence number"),
                    )
                })?),
            };
            if stream {
                rh::follow(
                    shard,
                    conn,
                    &id,
                    caller.token_hash,
                    Want::Responses {
                        after,
                        stream: true,
                    },
                    false,
                )
            } else {
                rh::read(shard, conn, &id, caller.token_hash, Purpose::Retrieve)
            }
        }
        responses::Route::Cancel(id) => {
            if let Some(store) = shard.shared.store.as_ref() {
                let gen = crate::store::gen_id(&id, &id);
                // The owner learns it at its next lease renewal; the answer waits for the end.
                if !store.send(shard.id, crate::store::thread::StoreOp::Cancel(gen)) {
                    shard.metrics.store_drops.inc();
                }
            }
            let want = Want::Responses {
                after: None,
                stream: false,
            };
            rh::follow(shard, conn, &id, caller.token_hash, want, true)
        }
        responses::Route::Delete(id) => {
            rh::read(shard, conn, &id, caller.token_hash, Purpose::Delete)
        }
        responses::Route::ChatStream(id) => {
            // `Last-Event-ID` (what EventSource sends when it reconnects) wins over the query.
            let given = info
                .last_event_id
                .as_deref()
                .or_else(|| responses::query(q, "last_event_id"));
            let after = match given {
                None | Some("") => 0,
                Some(v) => v.trim().parse::<u64>().map_err(|_| {
                    bad_param("last_event_id", format!("Last-Event-ID {v:?}: an event id"))
                })?,
            };
            rh::follow(
                shard,
                conn,
                &id,
                caller.token_hash,
                Want::Chat { after },
                false,
            )
        }
    }
}

fn random_hex() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 12];
    let _ = SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits for the in-flight HTTP response to finish while keeping a read pending, so a client
/// that disconnects is noticed at once (its generation is cancelled) and pipelined bytes are
/// buffered. Returns false when the client went away.
async fn wait_response<R: ConnRead>(conn: &Conn, rd: &mut R, buf: &mut BytesMut) -> bool {
    loop {
        if conn.http_busy.get().is_none()
            && conn.http_follow.get().is_none()
            && !conn.http_stored.get()
        {
            return true;
        }
        let done = std::pin::pin!(conn.response_done.notified());
        match rd.read_more_until(buf, READ_CHUNK, done).await {
            Ok(Some(0)) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

fn fail(shard: &Shard, conn: &Conn, e: &HttpError, in_head: bool) {
    if in_head {
        let label = if matches!(e, HttpError::HeadTooLarge) {
            "head_too_large"
        } else {
            "bad_request"
        };
        shard.metrics.handshake_failure(label);
    }
    e.write(&mut conn.out.borrow_mut().buf);
    conn.close_after_flush(shard);
}

fn upgrade(shard: &Shard, head: &Head<'_>) -> Result<Accepted, handshake::HandshakeError> {
    let req = HandshakeRequest {
        method: head.method,
        path: head.path,
        query: head.query,
        http_version_minor: head.version_minor,
        headers: &head.headers,
    };
    let cc = &shard.shared.config.session.compression;
    let budget = &shard.shared.compression;
    let tenants = shard.shared.tenants.current();
    let ctx = HandshakeContext {
        models: &shard.shared.models,
        tenants: &tenants,
        compression_allowed: cc.enabled && budget.has_room(),
        deflate_window_bits: (cc.deflate && budget.has_room_for(budget.deflate_bytes))
            .then_some(cc.deflate_window_bits),
        min_window: shard.shared.config.session.min_window,
        default_window: shard.shared.config.session.initial_window,
    };
    handshake::validate(&req, &ctx)
}

/// Reads the body the head announced. `Ok(None)`: the connection ended first.
async fn read_body<R: ConnRead>(
    shard: &Shard,
    conn: &Conn,
    rd: &mut R,
    buf: &mut BytesMut,
    info: &RequestInfo,
) -> Result<Option<Vec<u8>>, HttpError> {
    let max = shard.shared.config.server.max_body_bytes;
    let mut continued = false;
    let mut send_continue = |conn: &Conn| {
        if info.expect_continue && !continued {
            continued = true;
            conn.out
                .borrow_mut()
                .buf
                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            conn.wake_writer.notify();
        }
    };
    match info.body {
        BodyKind::None => Ok(Some(Vec::new())),
        BodyKind::Length(n) => {
            if n > max {
                return Err(HttpError::PayloadTooLarge);
            }
            while buf.len() < n {
                send_continue(conn);
                if rd
                    .read_more(buf, (n - buf.len()).min(1 << 20))
                    .await
                    .unwrap_or(0)
                    == 0
                {
                    return Ok(None);
                }
            }
            Ok(Some(buf.split_to(n).to_vec()))
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::default();
            let mut body = Vec::new();
            loop {
                let used = dec.feed(buf, &mut body, max)?;
                buf.advance(used);
                if dec.is_done() {
                    return Ok(Some(body));
                }
                send_continue(conn);
                if rd.read_more(buf, READ_CHUNK).await.unwrap_or(0) == 0 {
                    return Ok(None);
                }
            }
        }
    }
}
