//! The OpenAI HTTP side of a request on its shard: starting it from a parsed body, and its end
//! (SSE end or the one JSON body). Per-token text goes through `request::emit_text` like every
//! other sink's.

use std::rc::Rc;
use std::time::Instant;

use super::json::quoted;
use super::protocol::ProtocolError;
use super::request::{check_context, submit, ReqEntry, Sink};
use crate::engine::FinishReason;
use crate::http::sse::{self, SseMeta};
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::ws::handshake::StreamMode;

/// A request answered over HTTP: SSE when `stream`, else one JSON body at the end.
pub struct HttpSink {
    pub meta: SseMeta,
    pub stream: bool,
    pub include_usage: bool,
    /// The `200` and the role chunk went out.
    pub started: bool,
    /// Last bytes written (SSE keep-alive comments after a silence).
    pub last_write: Instant,
}

/// Silence after which a streaming HTTP response gets a `: keep-alive` comment.
pub const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Ends the response: the error, the SSE end (finish chunk, usage, `[DONE]`) or the JSON body
/// with everything held.
pub(super) fn finish_http(
    shard: &Shard,
    e: &ReqEntry,
    h: &HttpSink,
    reason: FinishReason,
    logprobs: Option<serde_json::Value>,
) {
    let mut out = e.conn.out.borrow_mut();
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
        let mut seq = e.seq;
        if !h.started {
            sse::write_stream_head(&mut out.buf);
            seq += 1;
            sse::write_text_event(&mut out.buf, &h.meta, seq, "", true, None);
        }
        let usage = h.include_usage.then_some(u);
        sse::write_stream_end(&mut out.buf, &h.meta, seq + 1, finish, usage, logprobs);
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

/// Starts a generation for an OpenAI HTTP request; the connection's reader waits until
/// `conn.http_busy` clears before it reads the next request.
pub fn start_http(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    req: crate::http::openai::OpenAiRequest,
    tenant: Option<usize>,
) -> Result<(), crate::http::openai::OpenAiError> {
    let shared = &shard.shared;
    let g = req.gen;
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
    let t = tenant.and_then(|i| shared.tenants.at(i));
    let model = g
        .model
        .as_deref()
        .or_else(|| shared.models.first().map(String::as_str))
        .unwrap_or_default();
    if let Some(t) = t.filter(|t| !t.allows_model(model)) {
        return Err(crate::http::openai::OpenAiError {
            status: 403,
            code: "model_not_allowed",
            message: format!("tenant {:?} may not use model `{model}`", t.id),
            param: Some("model"),
            retry_after: None,
        });
    }
    let prompt = shared.codec.encode(&g.input)?;
    check_context(shard, &g, prompt.len()).map_err(|mut e| {
        e.id = None;
        e
    })?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let meta = SseMeta {
        endpoint: req.endpoint,
        id_json: quoted(&g.id).into_boxed_str(),
        model_json: quoted(
            g.model
                .as_deref()
                .unwrap_or_else(|| shared.models.first().map_or("", |s| s.as_str())),
        )
        .into_boxed_str(),
        created,
    };
    let sink = Sink::Http(HttpSink {
        meta,
        stream: req.stream,
        include_usage: req.include_usage,
        started: false,
        last_write: Instant::now(),
    });
    let mut entry = ReqEntry::new(shard, conn, &g, StreamMode::Token, prompt.len(), sink);
    let max_tokens = g
        .params
        .max_tokens
        .unwrap_or(shared.config.session.default_max_tokens);
    entry
        .charge_tenant(shard, tenant, max_tokens)
        .map_err(|mut e| {
            e.id = None;
            e
        })?;
    let key = submit(shard, entry, prompt, g.params.clone()).map_err(|mut e| {
        e.id = None;
        e
    })?;
    conn.http_busy.set(Some(key));
    Ok(())
}
