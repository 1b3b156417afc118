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
use super::json::{quoted, write_delta_frame, write_json_frame};
use super::protocol::{GenerateMsg, ProtocolError};
use crate::engine::{EngineMsg, EventKind, FinishReason, GenerateRequest, SeqKey, TokenEvent};
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
    let now = Instant::now();
    let entry = ReqEntry {
        key: SeqKey {
            shard: shard.id,
            slot: 0,
            gen: 0,
        },
        conn: conn.clone(),
        id: g.id.clone().into_boxed_str(),
        id_json: quoted(&g.id).into_boxed_str(),
        mode,
        detok: shared.codec.detok(),
        seq: 0,
        tokens: 0,
        prompt_tokens: prompt.len() as u32,
        arrived: now,
        first_token: None,
        last_token: now,
        chunker: Chunker::default(),
    };
    let key = shard.insert_request(entry);
    let req = GenerateRequest {
        key,
        prompt,
        params: g.params,
    };
    let sent = shard
        .link
        .borrow_mut()
        .send(EngineMsg::Generate(Box::new(req)));
    if sent.is_err() {
        shard.requests.borrow_mut().try_remove(key.slot as usize);
        shard.metrics.outcome("rejected");
        return Err(ProtocolError::new(
            Some(id),
            "overloaded",
            "the engine queue is full; retry later",
        ));
    }
    if let Some(ws) = conn.ws.borrow_mut().as_mut() {
        ws.reqs.push((g.id.into_boxed_str(), key));
    }
    Ok(())
}

/// Routes one engine event. `now` is taken once per dispatched batch.
pub fn on_event(shard: &Shard, ev: TokenEvent) {
    let now = Instant::now();
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
        EventKind::Done(reason) => {
            let entry = reqs.remove(slot);
            drop(reqs);
            finish(shard, entry, reason, now);
        }
        EventKind::Rejected(why) => {
            let entry = reqs.remove(slot);
            drop(reqs);
            shard.metrics.outcome("rejected");
            let e = ProtocolError::new(
                Some(&entry.id),
                why.code(),
                "the engine refused the request; retry later",
            );
            forget(shard, &entry);
            if !entry.conn.is_closing() {
                super::ws::send_error(shard, &entry.conn, &e);
            }
        }
    }
}

#[inline]
fn on_token(shard: &Shard, e: &mut ReqEntry, id: u32, now: Instant) {
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
    if e.conn.is_closing() {
        return;
    }
    let text = e.detok.push(id);
    match e.mode {
        StreamMode::Token => {
            e.seq += 1;
            write_delta_frame(&mut e.conn.out.borrow_mut().buf, &e.id_json, e.seq, text);
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

/// Sends the pending chunk (if any) as one delta.
fn flush_chunk(shard: &Shard, e: &mut ReqEntry) {
    if e.chunker.pending.is_empty() {
        return;
    }
    e.seq += 1;
    write_delta_frame(
        &mut e.conn.out.borrow_mut().buf,
        &e.id_json,
        e.seq,
        &e.chunker.pending,
    );
    e.chunker.clear();
    shard.metrics.deltas_out.inc();
    shard.mark_dirty(&e.conn);
}

/// The tick's latency cap: chunks that waited too long for punctuation go out as they are.
pub fn flush_stale_chunks(shard: &Shard, now: Instant) {
    let mut reqs = shard.requests.borrow_mut();
    for (_, e) in reqs.iter_mut() {
        if e.mode == StreamMode::Chunk && e.chunker.is_stale(now) && !e.conn.is_closing() {
            flush_chunk(shard, e);
        }
    }
}

fn finish(shard: &Shard, mut e: ReqEntry, reason: FinishReason, now: Instant) {
    shard.metrics.outcome(reason.as_str());
    shard.metrics.e2e.observe(now.duration_since(e.arrived));
    forget(shard, &e);
    if e.conn.is_closing() {
        return;
    }
    flush_chunk(shard, &mut e);
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
    let done = json!({
        "type": "done", "id": &*e.id, "seq": e.seq + 1, "finish_reason": reason.as_str(),
        "usage": {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.tokens,
                  "total_tokens": e.prompt_tokens + e.tokens},
        "timings": {"ttft_ms": ttft_ms, "tokens_per_s": tps},
    });
    write_json_frame(&mut e.conn.out.borrow_mut().buf, &done);
    shard.mark_dirty(&e.conn);
}

/// Removes the request from its connection's list; closes a draining session that went idle.
fn forget(shard: &Shard, e: &ReqEntry) {
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
