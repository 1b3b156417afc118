//! One generation in flight on a shard: from the `generate` message to the `done` message.
//!
//! The shard keeps every in-flight request in a slab indexed by the engine key's slot; token
//! events from the engine find their request in O(1), are detokenized here, cut per stream
//! mode, and written straight into the connection's output queue as WebSocket frames.

use std::rc::Rc;
use std::time::Instant;

use serde_json::json;

use super::chunker::Chunker;
use super::codec::Detok;
use super::journal::{self, Journal};
use super::json::{
    quoted, write_delta_frame, write_delta_frame_logprobs, write_delta_payload_logprobs,
    write_json_frame,
};
use super::logprobs::{Logprobs, Shape};
use super::protocol::{GenerateMsg, ProtocolError};
use super::request_http::{finish_http, HttpSink, SSE_KEEP_ALIVE};
use crate::engine::sampler::SamplingParams;
use crate::engine::{
    EngineMsg, EventKind, FinishReason, GenerateRequest, RejectReason, SeqKey, TokenEvent,
};
use crate::http::sse;
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::ws::close::CloseCode;
use crate::ws::handshake::StreamMode;

/// A request's state on its shard.
pub struct ReqEntry {
    pub key: SeqKey,
    pub conn: Rc<Conn>,
    pub id: Box<str>,
    /// The id as a JSON string literal, escaped once.
    pub id_json: Box<str>,
    pub mode: StreamMode,
    pub detok: Detok,
    /// Deltas sent so far (the next delta gets `seq + 1`).
    pub seq: u64,
    pub tokens: u32,
    pub prompt_tokens: u32,
    pub arrived: Instant,
    pub first_token: Option<Instant>,
    pub last_token: Instant,
    /// `chunk` mode: text waiting for a boundary; `full` mode: the whole text.
    pub chunker: Chunker,
    pub sink: Sink,
    /// A stop string matched: the engine was told to cancel; report `stop`, not `cancelled`.
    pub stop_hit: bool,
    /// This token's text, reused across tokens (no allocation per token).
    pub scratch: String,
    /// Set when the request asked for logprobs.
    pub logprobs: Option<Box<Logprobs>>,
    /// Set when the generation is resumable: its messages also go to the state store.
    pub journal: Option<Journal>,
    /// The tenant's hold for this request (stream slot, tokens): released when the entry goes.
    pub charge: Option<crate::session::limits::Charge>,
    /// The tenant it was admitted under (its metrics and the log line).
    pub tenant: Option<std::sync::Arc<crate::ws::Tenant>>,
}

impl ReqEntry {
    /// Output goes to the connection (it is open and the client did not leave).
    pub fn live(&self) -> bool {
        !self.conn.is_closing() && self.journal.as_ref().is_none_or(|j| j.detached.is_none())
    }
}

/// Where a request's output goes.
pub enum Sink {
    /// WebSocket `delta` / `done` messages.
    Ws,
    /// An OpenAI-compatible HTTP response (SSE when `stream`, else one JSON body at the end).
    Http(HttpSink),
}

impl ReqEntry {
    /// A new request of `conn`; its key is set when the shard registers it.
    pub(super) fn new(
        shard: &Shard,
        conn: &Rc<Conn>,
        g: &GenerateMsg,
        mode: StreamMode,
        prompt_tokens: usize,
        sink: Sink,
    ) -> Self {
        let now = Instant::now();
        let shape = match &sink {
            Sink::Ws => Shape::Ws,
            Sink::Http(h) => match h.meta.endpoint {
                crate::http::openai::Endpoint::Chat => Shape::Chat,
                crate::http::openai::Endpoint::Completion => Shape::Completion,
            },
        };
        ReqEntry {
            key: SeqKey {
                shard: shard.id,
                slot: 0,
                gen: 0,
            },
            conn: conn.clone(),
            id: g.id.clone().into_boxed_str(),
            id_json: quoted(&g.id).into_boxed_str(),
            mode,
            detok: shard.shared.codec.detok(&g.stop),
            seq: 0,
            tokens: 0,
            prompt_tokens: prompt_tokens as u32,
            arrived: now,
            first_token: None,
            last_token: now,
            chunker: Chunker::default(),
            sink,
            stop_hit: false,
            scratch: String::new(),
            logprobs: g.params.logprobs.map(|_| Box::new(Logprobs::new(shape))),
            journal: None,
            charge: None,
            tenant: None,
        }
    }

    /// Takes the tenant's limits for this request: prompt + `max_tokens` tokens, one request,
    /// one stream. Authentication off (`None`): nothing to take.
    pub(super) fn charge_tenant(
        &mut self,
        tenant: Option<std::sync::Arc<crate::ws::Tenant>>,
        max_tokens: u32,
    ) -> Result<(), ProtocolError> {
        let Some(t) = tenant else {
            return Ok(());
        };
        let tokens = u64::from(self.prompt_tokens) + u64::from(max_tokens);
        match t.state.admit(tokens) {
            Ok(c) => {
                self.charge = Some(c);
                self.tenant = Some(t);
                Ok(())
            }
            Err(why) => Err(ProtocolError::limited(Some(&self.id), why, &t.id)),
        }
    }
}

/// A `max_tokens` the client set that cannot fit beside the prompt is refused up front, as
/// OpenAI and vLLM do, instead of being cut short at the end of the context. (A prompt that does
/// not fit on its own is the engine's `prompt_too_long`; the default `max_tokens` is cut.)
pub(super) fn check_context(
    shard: &Shard,
    g: &GenerateMsg,
    prompt_len: usize,
) -> Result<(), ProtocolError> {
    let Some(limit) = shard.shared.max_model_len.filter(|_| g.max_tokens_given) else {
        return Ok(());
    };
    let max_tokens = g.params.max_tokens.map_or(0, |m| m as usize);
    if prompt_len < limit && prompt_len + max_tokens > limit {
        return Err(ProtocolError::new(
            Some(&g.id),
            "context_length_exceeded",
            format!(
                "this model's maximum context length is {limit} tokens; the request has \
                 {prompt_len} prompt tokens, so max_tokens can be at most {} (got {max_tokens})",
                limit - prompt_len
            ),
        )
        .with_param("max_tokens"));
    }
    Ok(())
}

/// Registers the request on the shard and hands it to the engine; a full queue is `overloaded`.
pub(super) fn submit(
    shard: &Shard,
    entry: ReqEntry,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<SeqKey, ProtocolError> {
    let id = entry.id.clone();
    let tenant = entry.tenant.clone();
    let key = shard.insert_request(entry);
    let msg = EngineMsg::Generate(Box::new(GenerateRequest {
        key,
        prompt,
        params,
        generated: Vec::new(),
    }));
    if shard.link.borrow_mut().send(msg).is_err() {
        shard.requests.borrow_mut().try_remove(key.slot as usize);
        shard.metrics.outcome("rejected");
        tenant_outcome(tenant.as_ref(), "rejected");
        return Err(ProtocolError::new(
            Some(&id),
            "overloaded",
            "the engine queue is full; retry later",
        ));
    }
    Ok(key)
}

/// Starts a generation for a WebSocket `generate` message.
pub fn start_ws(shard: &Rc<Shard>, conn: &Rc<Conn>, g: GenerateMsg) -> Result<(), ProtocolError> {
    let shared = &shard.shared;
    let cfg = &shared.config.session;
    let id = g.id.as_str();
    let mode = {
        let ws = conn.ws.borrow();
        let Some(ws) = ws.as_ref() else {
            return Err(ProtocolError::new(Some(id), "internal_error", "no session"));
        };
        if ws.shutting_down {
            return Err(ProtocolError::new(
                Some(id),
                "shutting_down",
                "the server is shutting down",
            ));
        }
        if ws.reqs.iter().any(|(i, _)| **i == *id) {
            return Err(ProtocolError::new(
                Some(id),
                "duplicate_id",
                format!("a generation with id {id:?} is already running"),
            ));
        }
        if ws.reqs.len() >= cfg.max_requests_per_connection {
            return Err(ProtocolError::new(
                Some(id),
                "too_many_requests",
                format!(
                    "at most {} concurrent generations per connection",
                    cfg.max_requests_per_connection
                ),
            ));
        }
        if let Some(m) = &g.model {
            if *m != ws.model && !shared.models.contains(m) {
                return Err(ProtocolError::new(
                    Some(id),
                    "model_not_found",
                    format!("model {m:?} is not served here"),
                ));
            }
        }
        g.stream_mode.unwrap_or(ws.mode)
    };
    let prompt = shared.codec.encode(&g.input).map_err(|mut e| {
        e.id = Some(g.id.clone());
        e
    })?;
    check_context(shard, &g, prompt.len())?;
    let mut entry = ReqEntry::new(shard, conn, &g, mode, prompt.len(), Sink::Ws);
    let tenant = conn.ws.borrow().as_ref().and_then(|ws| ws.tenant.clone());
    let max_tokens = g.params.max_tokens.unwrap_or(cfg.default_max_tokens);
    entry.charge_tenant(tenant, max_tokens)?;
    let mut params = g.params.clone();
    let start = {
        let ws = conn.ws.borrow();
        ws.as_ref().and_then(|ws| {
            let (j, start) = journal_for(
                shard,
                Logged {
                    session: &ws.session,
                    id: &g.id,
                    token_hash: ws.token_hash,
                    mode,
                    prompt: &prompt,
                    stop: &g.stop,
                    http: None,
                },
                &mut params,
            )?;
            entry.journal = Some(j);
            Some(start)
        })
    };
    let key = submit(shard, entry, prompt, params)?;
    if let Some(start) = start {
        journal::start(shard, start);
    }
    if let Some(ws) = conn.ws.borrow_mut().as_mut() {
        ws.reqs.push((g.id.into_boxed_str(), key));
    }
    Ok(())
}

/// What a logged generation is stored under and with.
pub(super) struct Logged<'a> {
    pub session: &'a str,
    pub id: &'a str,
    pub token_hash: [u8; 32],
    pub mode: StreamMode,
    pub prompt: &'a [u32],
    pub stop: &'a [String],
    pub http: Option<crate::http::responses::HttpMeta>,
}

/// The journal and the store `Start` of a new logged generation (`None`: resume is off). A
/// generation without a seed gets one here: a takeover must continue the same random stream.
pub(super) fn journal_for(
    shard: &Shard,
    l: Logged<'_>,
    params: &mut SamplingParams,
) -> Option<(Journal, crate::store::Start)> {
    let store = shard.shared.store.as_ref()?;
    if params.seed.is_none() {
        params.seed = Some(random_seed());
    }
    let background = l.http.as_ref().is_some_and(|h| h.background);
    let req = journal::StoredRequest {
        id: l.id.to_owned(),
        mode: l.mode.as_str().into(),
        prompt: l.prompt.to_vec(),
        params: params.clone(),
        stop: l.stop.to_vec(),
        http: l.http,
    };
    let gen = crate::store::gen_id(l.session, l.id);
    let request = super::resume::stored_request(&req)?;
    // The embedded store: this shard appends to the log in place.
    let local = store.local.as_ref().map(|c| {
        let tokens = params.max_tokens.unwrap_or(256) as usize;
        let room = tokens * crate::store::local::BYTES_PER_TOKEN;
        crate::store::local::GenLog::shared(1, c.clone(), room)
    });
    let mut j = Journal::new(gen.clone(), 1, None, local.clone());
    j.background = background;
    let start = crate::store::Start {
        gen,
        session: l.session.into(),
        token_hash: l.token_hash,
        owner: store.instance.clone(),
        request,
        log: local,
        ack: None,
    };
    Some((j, start))
}

/// Counts an ended request under its tenant too (`seedance_requests_total{tenant}`).
fn tenant_outcome(tenant: Option<&std::sync::Arc<crate::ws::Tenant>>, label: &str) {
    if let Some(t) = tenant {
        t.state.outcome(label);
    }
}

fn random_seed() -> u64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 8];
    let _ = SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// Routes one engine event. `now` is taken once per dispatched batch.
pub fn on_event(shard: &Shard, ev: TokenEvent, now: Instant) {
    let mut reqs = shard.requests.borrow_mut();
    let slot = ev.key.slot as usize;
    let Some(entry) = reqs.get_mut(slot) else {
        return;
    };
    if entry.key != ev.key {
        return;
    }
    match ev.kind {
        EventKind::Token(id) => on_token(shard, entry, id, now),
        EventKind::Logprob {
            rank,
            token,
            logprob,
        } => {
            if let Some(lp) = entry.logprobs.as_deref_mut() {
                lp.on_event(rank, token, logprob);
            }
        }
        EventKind::Done(reason) => {
            let entry = reqs.remove(slot);
            drop(reqs);
            finish(shard, entry, reason, now);
        }
        EventKind::Rejected(why) => {
            let entry = reqs.remove(slot);
            drop(reqs);
            shard.metrics.outcome("rejected");
            tenant_outcome(entry.tenant.as_ref(), "rejected");
            let (status, message) = match why {
                RejectReason::Overloaded => (429, "the engine is at capacity; retry later"),
                RejectReason::PromptTooLong => (
                    400,
                    "the prompt does not fit the model's context (max_model_len) or KV cache",
                ),
            };
            let e = ProtocolError::new(Some(&entry.id), why.code(), message);
            let mut entry = entry;
            if matches!(entry.sink, Sink::Http(_)) {
                // Its views (a response read back later) must see it end.
                let mut done = done_json(&entry, FinishReason::Error, now);
                done["error"] = json!({"code": e.code, "message": &e.message});
                log_done(shard, &mut entry, &done);
            }
            forget(shard, &entry);
            if entry.live() {
                match &entry.sink {
                    Sink::Ws => super::ws::send_error(shard, &entry.conn, &e),
                    Sink::Http(h) => {
                        let mut out = entry.conn.out.borrow_mut();
                        if let (true, Some(rv)) = (h.started, h.responses.as_deref()) {
                            let end = crate::http::responses::End {
                                finish_reason: "error".into(),
                                prompt_tokens: u64::from(entry.prompt_tokens),
                                completion_tokens: u64::from(entry.tokens),
                                error: Some((e.code.into(), e.message.clone())),
                            };
                            rv.end(&mut out.buf, entry.seq + 1, &end);
                            sse::write_last_chunk(&mut out.buf);
                        } else if h.started {
                            sse::write_stream_error(&mut out.buf, e.code, &e.message);
                        } else {
                            crate::http::response::write_json_error(
                                &mut out.buf,
                                status,
                                e.code,
                                &e.message,
                                None,
                                false,
                            );
                        }
                        drop(out);
                        shard.mark_dirty(&entry.conn);
                    }
                }
            }
        }
    }
}

#[inline]
fn on_token(shard: &Shard, e: &mut ReqEntry, id: u32, now: Instant) {
    if e.stop_hit {
        // Generated after the stop string completed, before the engine saw the cancel.
        return;
    }
    e.tokens += 1;
    shard.metrics.generated_tokens.inc();
    match e.first_token {
        None => {
            e.first_token = Some(now);
            shard.metrics.ttft.observe(now.duration_since(e.arrived));
        }
        Some(_) => shard.metrics.itl.observe(now.duration_since(e.last_token)),
    }
    e.last_token = now;
    match e.journal.as_mut() {
        Some(j) if j.stopped => return,
        Some(j) => j.tokens.push(id),
        None if e.conn.is_closing() => return,
        None => {}
    }
    let mut text = std::mem::take(&mut e.scratch);
    text.clear();
    text.push_str(e.detok.push(id));
    if let Some(lp) = e.logprobs.as_deref_mut() {
        let (start, sent) = e.detok.text_positions();
        lp.on_token(id, start);
        lp.release_upto(sent);
    }
    emit_text(shard, e, &text, now);
    e.scratch = text;
    if e.detok.stopped() && !e.stop_hit {
        e.stop_hit = true;
        shard.send_control(EngineMsg::Cancel(e.key));
    }
}

/// Sends (or holds, per stream mode) newly completed text.
fn emit_text(shard: &Shard, e: &mut ReqEntry, text: &str, now: Instant) {
    if let Sink::Http(_) = e.sink {
        emit_http(shard, e, text, now);
        return;
    }
    match e.mode {
        StreamMode::Token => {
            e.seq += 1;
            write_ws_delta(shard, e, text);
            shard.metrics.deltas_out.inc();
            shard.mark_dirty(&e.conn);
        }
        StreamMode::Chunk => {
            if e.chunker.push(text, now) {
                flush_chunk(shard, e);
            }
        }
        StreamMode::Full => e.chunker.pending.push_str(text),
    }
}

/// An HTTP request's new text: its SSE event (chat chunk or Responses delta) while its client
/// is there, held for the JSON answer otherwise, and logged when the generation is.
fn emit_http(shard: &Shard, e: &mut ReqEntry, text: &str, now: Instant) {
    let live = e.live();
    let Sink::Http(h) = &mut e.sink else {
        return;
    };
    if !text.is_empty() {
        e.seq += 1;
    }
    let seq = e.seq;
    if live && h.stream {
        let mut out = e.conn.out.borrow_mut();
        if !h.started {
            h.started = true;
            sse::write_stream_head(&mut out.buf);
            match h.responses.as_deref() {
                Some(rv) => rv.prelude(&mut out.buf),
                None => sse::write_text_event(&mut out.buf, &h.meta, 0, "", true, None),
            }
        }
        if !text.is_empty() {
            match h.responses.as_deref_mut() {
                Some(rv) => rv.delta(&mut out.buf, seq, text),
                None => {
                    let lp = take_logprobs(shard, &mut e.logprobs);
                    sse::write_text_event(&mut out.buf, &h.meta, seq, text, false, lp.as_ref());
                }
            }
        }
        h.last_write = now;
        drop(out);
        shard.metrics.deltas_out.inc();
        shard.mark_dirty(&e.conn);
    } else if !text.is_empty() {
        match h.responses.as_deref_mut() {
            Some(rv) => rv.text.push_str(text),
            None => e.chunker.pending.push_str(text),
        }
    }
    if !text.is_empty() {
        if let Some(j) = e.journal.as_mut().filter(|j| j.logging()) {
            journal::send_delta(shard, e.key, j, seq, &e.id_json, text, None);
        }
    }
}

/// Sends the pending chunk (if any) as one delta.
fn flush_chunk(shard: &Shard, e: &mut ReqEntry) {
    if e.chunker.pending.is_empty() {
        return;
    }
    e.seq += 1;
    let text = std::mem::take(&mut e.chunker.pending);
    write_ws_delta(shard, e, &text);
    e.chunker.pending = text;
    e.chunker.clear();
    shard.metrics.deltas_out.inc();
    shard.mark_dirty(&e.conn);
}

/// The waiting logprob reports of a request that asked for them, for the message going out.
fn take_logprobs(shard: &Shard, lp: &mut Option<Box<Logprobs>>) -> Option<serde_json::Value> {
    lp.as_deref_mut()?.take_json(&shard.shared.codec)
}

/// Writes `delta` number `e.seq` (with the logprobs of the tokens it carries if asked for) to
/// the connection while the client is there, and to the log when the generation is resumable.
fn write_ws_delta(shard: &Shard, e: &mut ReqEntry, text: &str) {
    let live = e.live();
    let lp = take_logprobs(shard, &mut e.logprobs);
    let (seq, id_json) = (e.seq, &*e.id_json);
    let key = e.key;
    match e.journal.as_mut().filter(|j| j.logging()) {
        Some(j) => {
            let mut out = e.conn.out.borrow_mut();
            let buf = live.then_some(&mut out.buf);
            match &lp {
                None => journal::send_delta(shard, key, j, seq, id_json, text, buf),
                Some(v) => journal::send_logged(shard, key, j, seq, false, buf, |b| {
                    let v = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
                    write_delta_payload_logprobs(b, id_json, seq, text, &v)
                }),
            }
        }
        None if live => {
            let buf = &mut e.conn.out.borrow_mut().buf;
            match lp {
                Some(v) => write_delta_frame_logprobs(buf, id_json, seq, text, &v),
                None => write_delta_frame(buf, id_json, seq, text),
            }
        }
        None => {}
    }
}

/// The tick's latency cap: chunks that waited too long for punctuation go out as they are.
pub fn flush_stale_chunks(shard: &Shard, now: Instant) {
    let mut reqs = shard.requests.borrow_mut();
    for (_, e) in reqs.iter_mut() {
        if e.conn.is_closing() && e.journal.is_none() {
            continue;
        }
        match &mut e.sink {
            Sink::Ws => {
                if e.mode == StreamMode::Chunk && e.chunker.is_stale(now) {
                    flush_chunk(shard, e);
                }
            }
            Sink::Http(h) => {
                if h.stream && h.started && now.duration_since(h.last_write) > SSE_KEEP_ALIVE {
                    h.last_write = now;
                    sse::write_chunk(&mut e.conn.out.borrow_mut().buf, |o| {
                        o.extend_from_slice(sse::KEEP_ALIVE)
                    });
                    shard.mark_dirty(&e.conn);
                }
            }
        }
    }
}

fn finish(shard: &Shard, mut e: ReqEntry, reason: FinishReason, now: Instant) {
    // A matched stop string wins over whatever the engine reports after it.
    let reason = if e.stop_hit {
        FinishReason::Stop
    } else {
        reason
    };
    if e.journal.as_ref().is_some_and(|j| j.stopped) {
        // Carried on by another instance: its end is not ours to report.
        forget(shard, &e);
        return;
    }
    shard.metrics.outcome(reason.as_str());
    tenant_outcome(e.tenant.as_ref(), reason.as_str());
    shard.metrics.e2e.observe(now.duration_since(e.arrived));
    if let Some(c) = e.charge.as_mut() {
        // What it used; the rest of its charge goes back when the entry is dropped.
        c.used = u64::from(e.prompt_tokens) + u64::from(e.tokens);
    }
    tracing::debug!(
        target: "seedance::request",
        id = &*e.id,
        tenant = e.tenant.as_ref().map(|t| t.id.as_str()),
        reason = reason.as_str(),
        prompt_tokens = e.prompt_tokens,
        completion_tokens = e.tokens,
        ms = now.duration_since(e.arrived).as_millis() as u64,
        "request done"
    );
    if e.live() || e.journal.is_some() {
        write_end(shard, &mut e, reason, now);
    }
    // After the end is queued: a draining session closes (1001) once its last request is done.
    forget(shard, &e);
}

/// Queues held-back text and the end of the response (`done`, SSE end or JSON body).
fn write_end(shard: &Shard, e: &mut ReqEntry, reason: FinishReason, now: Instant) {
    // Held-back text goes out only at a normal end (a stop string swallowed it, a cancel or an
    // error drops it); the reports of its tokens follow the text.
    let tail_out = !e.stop_hit && matches!(reason, FinishReason::Stop | FinishReason::Length);
    if let Some(lp) = e.logprobs.as_deref_mut() {
        lp.settle(tail_out);
    }
    let tail = e.detok.finish().to_owned();
    if !tail.is_empty() && tail_out {
        if e.mode == StreamMode::Token && matches!(e.sink, Sink::Ws) {
            // Held-back text is its own delta in token mode.
            e.seq += 1;
            write_ws_delta(shard, e, &tail);
        } else {
            emit_text(shard, e, &tail, now);
        }
    }
    if let Sink::Http(h) = &e.sink {
        let logprobs = match e.logprobs.as_deref_mut() {
            // A non-streamed answer always has the object; a stream's last chunk only when
            // tokens that produced no text are left.
            Some(lp) if !h.stream => Some(lp.take_json_or_empty(&shard.shared.codec)),
            Some(lp) => lp.take_json(&shard.shared.codec),
            None => None,
        };
        let done = done_json(e, reason, now);
        log_done(shard, e, &done);
        if e.live() {
            finish_http(shard, e, reason, logprobs);
        }
        return;
    }
    flush_chunk(shard, e);
    let mut done = done_json(e, reason, now);
    // Tokens that produced no text (e.g. a skipped special token at the end).
    if let Some(lp) = take_logprobs(shard, &mut e.logprobs) {
        done["logprobs"] = lp;
    }
    if shard.shared.store.is_some() {
        done["resumable"] = e.journal.as_ref().is_some_and(|j| j.logging()).into();
    }
    let live = e.live();
    match e.journal.as_mut().filter(|j| j.logging()) {
        Some(j) => {
            let mut out = e.conn.out.borrow_mut();
            let buf = live.then_some(&mut out.buf);
            journal::send_logged(shard, e.key, j, e.seq + 1, true, buf, |b| {
                let _ = serde_json::to_writer(bytes::BufMut::writer(b), &done);
            });
        }
        None if live => write_json_frame(&mut e.conn.out.borrow_mut().buf, &done),
        None => {}
    }
    shard.mark_dirty(&e.conn);
}

/// Logs the `done` of a logged generation (the HTTP views read its end from it).
fn log_done(shard: &Shard, e: &mut ReqEntry, done: &serde_json::Value) {
    let (key, seq) = (e.key, e.seq + 1);
    if let Some(j) = e.journal.as_mut().filter(|j| j.logging()) {
        journal::send_logged(shard, key, j, seq, true, None, |b| {
            let _ = serde_json::to_writer(bytes::BufMut::writer(b), done);
        });
    }
}

/// The `done` message: seq, finish reason, usage, timings.
fn done_json(e: &ReqEntry, reason: FinishReason, now: Instant) -> serde_json::Value {
    let ttft_ms = e
        .first_token
        .map(|t| t.duration_since(e.arrived).as_secs_f64() * 1e3);
    let gen_secs = e
        .first_token
        .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    let tps = if e.tokens > 1 && gen_secs > 0.0 {
        (e.tokens - 1) as f64 / gen_secs
    } else {
        0.0
    };
    json!({
        "type": "done", "id": &*e.id, "seq": e.seq + 1, "finish_reason": reason.as_str(),
        "usage": {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.tokens,
                  "total_tokens": e.prompt_tokens + e.tokens},
        "timings": {"ttft_ms": ttft_ms, "tokens_per_s": tps},
    })
}

/// Removes the request from its connection's list; closes a draining session that went idle.
fn forget(shard: &Shard, e: &ReqEntry) {
    if let Sink::Http(_) = e.sink {
        if e.conn.http_busy.get() == Some(e.key) {
            e.conn.http_busy.set(None);
            e.conn.response_done.notify();
        }
        return;
    }
    let now_idle_and_draining = {
        let mut ws = e.conn.ws.borrow_mut();
        let Some(ws) = ws.as_mut() else { return };
        ws.reqs.retain(|(_, k)| *k != e.key);
        ws.shutting_down && ws.reqs.is_empty()
    };
    if now_idle_and_draining {
        super::ws::close_with(
            shard,
            &e.conn,
            CloseCode::GOING_AWAY,
            "server shutting down",
            "going_away",
        );
    }
}
