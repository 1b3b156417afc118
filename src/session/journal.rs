//! The shard's side of the log: every message a resumable generation sends is also queued for
//! the state store, one batch per dispatch; leases are renewed in one batch per renewal period;
//! a generation whose client went away runs on, detached, for `resume_grace`.
//!
//! Nothing here waits for the store. A batch that finds the state queue full is dropped, and
//! its generations are marked not resumable (their `done` says so) — the live stream goes on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::resume::Follower;
use crate::engine::sampler::SamplingParams;
use crate::engine::{EngineMsg, SeqKey};
use crate::server::shard::Shard;
use crate::store::local::{LocalLog, Run, Stage};
use crate::store::thread::{OwnerNote, StoreOp, StoreReply};
use crate::store::{Appended, BatchBuilder, GenId, Lease, Start};
use crate::ws::handshake::StreamMode;

/// A resumable generation's link to its log.
pub struct Journal {
    pub gen: GenId,
    pub epoch: u64,
    /// Generated since the last logged message (they go with the next one).
    pub tokens: Vec<u32>,
    /// Its client is gone (since then); the generation runs on for `resume_grace`.
    pub detached: Option<Instant>,
    /// A background response: it runs to its end with or without a client.
    pub background: bool,
    /// Messages were lost on the way to the store: no longer logged, `done` says so.
    pub broken: bool,
    /// Another instance carries it on (fenced, or handed over on SIGTERM): send nothing more.
    pub stopped: bool,
    /// Its log, written in place (the embedded store); `None`: messages go to the state
    /// thread in batches.
    pub local: Option<LocalLog>,
    /// Its messages staged in the shard's [`Stage`], not yet published into `local`.
    staged: Run,
    /// A client on this instance followed the log at the last publish: every message is
    /// published at once and handed to the state thread too (it pushes them to the client).
    followed: bool,
    /// Its entry in the shard's pending batch (valid while that batch's number is `batch`).
    batch: u64,
    idx: u32,
}

impl Journal {
    pub fn new(gen: GenId, epoch: u64, detached: Option<Instant>, local: Option<LocalLog>) -> Self {
        Journal {
            gen,
            epoch,
            tokens: Vec::new(),
            detached,
            background: false,
            broken: false,
            stopped: false,
            local,
            staged: Run::default(),
            followed: false,
            batch: u64::MAX,
            idx: 0,
        }
    }

    /// Messages still go to the log.
    pub fn logging(&self) -> bool {
        !self.broken && !self.stopped
    }
}

/// What a new owner needs to carry a generation on (stored as JSON with its metadata).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StoredRequest {
    pub id: String,
    pub mode: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// A generation made over HTTP (a Responses API response, a resumable chat stream):
    /// what its HTTP views render from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<crate::http::responses::HttpMeta>,
}

impl StoredRequest {
    pub fn stream_mode(&self) -> StreamMode {
        StreamMode::parse(self.mode.as_bytes()).unwrap_or(StreamMode::Token)
    }
}

/// A batch is sent early once its texts pass this (offsets in a batch are `u32`).
const BATCH_MAX_BYTES: usize = 1 << 30;

/// The shard's pending store traffic and its resumed clients.
#[derive(Default)]
pub struct ShardJournal {
    starts: RefCell<Vec<Start>>,
    /// This dispatch's messages, and the request that wrote each entry.
    batch: RefCell<BatchBuilder>,
    keys: RefCell<Vec<SeqKey>>,
    batch_no: Cell<u64>,
    /// Where a logged message's JSON is written before it goes to the socket and the batch.
    scratch: RefCell<BytesMut>,
    /// Resumed clients on this shard, by ticket.
    pub followers: RefCell<HashMap<u64, Follower>>,
    /// Whole-log reads that HTTP requests on this shard wait for, by ticket.
    pub reads: RefCell<HashMap<u64, super::resume_http::PendingRead>>,
    next_ticket: Cell<u64>,
    last_renew: Cell<Option<Instant>>,
    /// Messages staged for the embedded store's logs, and the requests that staged them
    /// (published at the next tick).
    stage: RefCell<Stage>,
    staged: RefCell<Vec<SeqKey>>,
    /// Answers that wait for their generation's `Start` to reach the store.
    pub stored_answers: RefCell<Vec<super::request_http::StoredAnswer>>,
}

impl ShardJournal {
    /// A ticket unique across the instance (the shard id in the top bits).
    pub fn ticket(&self, shard: u16) -> u64 {
        let n = self.next_ticket.get() + 1;
        self.next_ticket.set(n);
        (u64::from(shard) << 48) | (n & ((1 << 48) - 1))
    }
}

/// Registers a new resumable generation (its `Start` goes with this dispatch's batch).
pub fn start(shard: &Shard, start: Start) {
    shard.journal.starts.borrow_mut().push(start);
}

/// How a plain delta is logged: this byte, then its text. The JSON around it (id, seq) is
/// rebuilt on replay, so the log holds a few bytes per token rather than a whole message.
/// Every other message (a delta with logprobs, the `done`) is logged as its JSON object.
pub const TEXT_DELTA: u8 = 0;

/// Writes a logged message as the WebSocket text frame its client gets.
pub fn render(buf: &mut BytesMut, id_json: &str, seq: u64, logged: &[u8]) {
    match logged.split_first() {
        Some((&TEXT_DELTA, text)) => {
            let text = String::from_utf8_lossy(text);
            crate::session::json::write_delta_frame(buf, id_json, seq, &text);
        }
        _ => {
            crate::session::json::put_text_header(buf, logged.len());
            buf.extend_from_slice(logged);
        }
    }
}

/// Sends delta `seq` (plain text, no logprobs) of `key`'s generation to `live` (the
/// connection's output buffer, while its client is there) and logs it.
pub fn send_delta(
    shard: &Shard,
    key: SeqKey,
    j: &mut Journal,
    seq: u64,
    id_json: &str,
    text: &str,
    live: Option<&mut BytesMut>,
) {
    if let Some(buf) = live {
        crate::session::json::write_delta_frame(buf, id_json, seq, text);
    }
    log(shard, key, j, seq, &[TEXT_DELTA], text.as_bytes(), false);
}

/// Writes message `seq` of `key`'s generation with `write` (its JSON text), sends it to the
/// client when `live` is given (the connection's output buffer), and logs it.
pub fn send_logged(
    shard: &Shard,
    key: SeqKey,
    j: &mut Journal,
    seq: u64,
    done: bool,
    live: Option<&mut BytesMut>,
    write: impl FnOnce(&mut BytesMut),
) {
    let mut text = shard.journal.scratch.borrow_mut();
    text.clear();
    write(&mut text);
    if let Some(buf) = live {
        crate::session::json::put_text_header(buf, text.len());
        buf.extend_from_slice(&text);
    }
    log(shard, key, j, seq, &[], &text, done);
}

/// Logs one message of `key`'s generation: in place (embedded store), or queued for the
/// state thread in this dispatch's batch (also in place, when a client on this instance
/// follows the generation: the state thread pushes it to them).
fn log(
    shard: &Shard,
    key: SeqKey,
    j: &mut Journal,
    seq: u64,
    head: &[u8],
    body: &[u8],
    done: bool,
) {
    if !j.logging() {
        return;
    }
    let sj = &shard.journal;
    if j.local.is_some() {
        let staged = sj
            .stage
            .borrow_mut()
            .push(&mut j.staged, seq, head, body, &j.tokens, done);
        match staged {
            Ok(true) => sj.staged.borrow_mut().push(key),
            Ok(false) => {}
            Err(_full) => {
                // No tick for a long while: this message goes to the log directly.
                publish(shard, key, j);
                let r = match j.local.as_ref().map(|l| l.lock()) {
                    Some(Ok(mut l)) => l.append(j.epoch, seq, head, body, &j.tokens, done),
                    _ => Appended::Gone,
                };
                if r != Appended::Ok {
                    j.broken = true;
                }
            }
        }
        if j.followed || done {
            publish(shard, key, j);
        }
        if !j.followed || !j.logging() {
            j.tokens.clear();
            return;
        }
    }
    let full = {
        let mut b = sj.batch.borrow_mut();
        if j.batch != sj.batch_no.get() || b.next_seq(j.idx) != Some(seq) {
            j.batch = sj.batch_no.get();
            j.idx = b.open(&j.gen, j.epoch, seq);
            sj.keys.borrow_mut().push(key);
        }
        b.push(j.idx, head, body, &j.tokens, done);
        j.tokens.clear();
        b.bytes() > BATCH_MAX_BYTES
    };
    if full {
        flush(shard);
    }
}

/// Publishes `j`'s staged messages into its log (the embedded store).
fn publish(shard: &Shard, key: SeqKey, j: &mut Journal) {
    let Some(local) = &j.local else {
        return;
    };
    if j.staged.is_empty() {
        return;
    }
    let (r, followed) = match local.lock() {
        Ok(mut l) => {
            let r = shard
                .journal
                .stage
                .borrow_mut()
                .publish(&mut j.staged, &mut l, j.epoch);
            (r, l.followed)
        }
        Err(_) => {
            j.staged = Run::default();
            (Appended::Gone, false)
        }
    };
    j.followed = followed;
    let what = match r {
        Appended::Ok | Appended::Duplicate => return,
        Appended::Fenced => OwnerNote::Fenced,
        Appended::Gone | Appended::Gap => {
            tracing::warn!(
                shard = shard.id,
                gen = &*j.gen,
                "log evicted or closed: not resumable"
            );
            OwnerNote::Unsafe
        }
    };
    j.broken = true;
    if let Some(b) = shard
        .shared
        .store
        .as_ref()
        .and_then(|s| s.boxes.get(shard.id as usize))
    {
        b.post(StoreReply::Owner { key, what });
    }
}

/// Every tick: publishes what the shard's generations staged (a resume on this instance finds
/// a log at most a tick behind what its client got, and waits for it to catch up).
pub fn publish_staged(shard: &Shard) {
    let mut keys = std::mem::take(&mut *shard.journal.staged.borrow_mut());
    if keys.is_empty() {
        return;
    }
    {
        let mut reqs = shard.requests.borrow_mut();
        for key in &keys {
            if let Some(e) = reqs.get_mut(key.slot as usize).filter(|e| e.key == *key) {
                if let Some(j) = e.journal.as_mut() {
                    publish(shard, *key, j);
                }
            }
        }
    }
    keys.clear();
    shard.journal.stage.borrow_mut().clear();
    let mut staged = shard.journal.staged.borrow_mut();
    if staged.is_empty() {
        // Keep the buffer.
        *staged = keys;
    }
}

/// Sends this dispatch's batch to the state thread (called once per dispatch).
pub fn flush(shard: &Shard) {
    let sj = &shard.journal;
    let Some(store) = shard.shared.store.as_ref() else {
        return;
    };
    if sj.batch.borrow().is_empty() && sj.starts.borrow().is_empty() {
        return;
    }
    let batch = {
        let mut b = sj.batch.borrow_mut();
        if b.is_empty() {
            // Only new generations: the builder keeps its buffers.
            crate::store::Batch::default()
        } else {
            b.take(store.boxes.get(shard.id as usize).and_then(|r| r.spare()))
        }
    };
    let logged = store.local.is_some();
    let op = StoreOp::Write {
        shard: shard.id,
        starts: std::mem::take(&mut *sj.starts.borrow_mut()),
        batch,
        keys: std::mem::take(&mut *sj.keys.borrow_mut()),
        logged,
    };
    sj.batch_no.set(sj.batch_no.get().wrapping_add(1));
    let Err(StoreOp::Write {
        starts, mut keys, ..
    }) = store.try_send(shard.id, op)
    else {
        return;
    };
    if logged {
        // Messages logged in place are not lost: a follower that misses them reads the log.
        keys.clear();
    }
    for key in starts.iter().filter_map(|s| s.ack) {
        super::request_http::on_stored(shard, key, false);
    }
    let gens: Vec<GenId> = starts.iter().map(|s| s.gen.clone()).collect();
    if keys.is_empty() && gens.is_empty() {
        return;
    }
    // The state queue is full: these generations cannot be resumed any more.
    shard.metrics.store_drops.inc();
    tracing::warn!(
        shard = shard.id,
        generations = keys.len() + gens.len(),
        "state queue full: generations marked not resumable"
    );
    let mut reqs = shard.requests.borrow_mut();
    for (_, e) in reqs.iter_mut() {
        if let Some(j) = e.journal.as_mut() {
            if keys.contains(&e.key) || gens.contains(&j.gen) {
                j.broken = true;
            }
        }
    }
}

/// The client of `key` went away: keep generating into the log for `resume_grace`.
/// Returns false when the generation is not resumable (the caller cancels it).
pub fn detach(shard: &Shard, key: SeqKey, paused: bool) -> bool {
    let mut reqs = shard.requests.borrow_mut();
    let Some(e) = reqs.get_mut(key.slot as usize).filter(|e| e.key == key) else {
        return false;
    };
    let Some(j) = e.journal.as_mut().filter(|j| j.logging()) else {
        return false;
    };
    j.detached = Some(Instant::now());
    if paused {
        // Paused for the old socket's backlog; the log takes whatever comes.
        shard.send_control(EngineMsg::Resume(key));
    }
    true
}

/// Every tick: lease renewals (one batch per third of the lease) and the grace period of
/// detached generations.
pub fn on_tick(shard: &Shard, now: Instant) {
    let Some(store) = shard.shared.store.as_ref() else {
        return;
    };
    let cfg = &shard.shared.config.resume;
    let every = (cfg.lease / 3).max(Duration::from_millis(50));
    let due = shard
        .journal
        .last_renew
        .get()
        .is_none_or(|t| now.duration_since(t) >= every);
    let mut leases = Vec::new();
    let mut expired = Vec::new();
    {
        let reqs = shard.requests.borrow();
        for (_, e) in reqs.iter() {
            let Some(j) = e.journal.as_ref().filter(|j| !j.stopped) else {
                continue;
            };
            if due {
                let lease = Lease {
                    gen: j.gen.clone(),
                    epoch: j.epoch,
                };
                leases.push((lease, e.key));
            }
            if !j.background
                && j.detached
                    .is_some_and(|t| now.duration_since(t) > cfg.grace)
            {
                expired.push(e.key);
            }
        }
    }
    if due {
        shard.journal.last_renew.set(Some(now));
        shard.metrics.leases_held.set(leases.len() as u64);
        if !leases.is_empty() && !store.send(shard.id, StoreOp::Renew(leases)) {
            shard.metrics.store_drops.inc();
        }
    }
    for key in expired {
        if let Some(e) = shard.requests.borrow_mut().get_mut(key.slot as usize) {
            // Counted once: the grace check skips it from now on.
            if let Some(j) = e.journal.as_mut() {
                j.detached = None;
            }
        }
        tracing::debug!(shard = shard.id, "resume grace over: cancelling");
        shard.send_control(EngineMsg::Cancel(key));
    }
}

/// SIGTERM with a shared store: stop every resumable generation here and release its lease, so
/// that the instance a client resumes on takes it over at once. Returns the hand-overs by
/// connection, for the final `session` note.
pub fn hand_over(shard: &Shard) -> Vec<(SeqKey, Arc<str>, u64)> {
    let Some(store) = shard.shared.store.as_ref().filter(|s| s.shared) else {
        return Vec::new();
    };
    let mut released = Vec::new();
    let mut handed = Vec::new();
    {
        let mut reqs = shard.requests.borrow_mut();
        for (_, e) in reqs.iter_mut() {
            let Some(j) = e.journal.as_mut().filter(|j| j.logging()) else {
                continue;
            };
            j.stopped = true;
            released.push(Lease {
                gen: j.gen.clone(),
                epoch: j.epoch,
            });
            handed.push((e.key, j.gen.clone(), e.seq));
        }
    }
    for (key, _, _) in &handed {
        shard.send_control(EngineMsg::Cancel(*key));
    }
    // The last messages first, then the releases (one queue: the order holds).
    flush(shard);
    if !released.is_empty() && !store.send(shard.id, StoreOp::Release(released)) {
        shard.metrics.store_drops.inc();
    }
    handed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replayed message is byte for byte the frame the live client got.
    #[test]
    fn replay_renders_the_live_frames() {
        for text in [
            "",
            "Paris",
            "a \"quoted\"\n\u{1F600} line",
            &"x".repeat(70_000),
        ] {
            let mut live = BytesMut::new();
            crate::session::json::write_delta_frame(&mut live, "\"c1\"", 42, text);
            let mut logged = vec![TEXT_DELTA];
            logged.extend_from_slice(text.as_bytes());
            let mut replayed = BytesMut::new();
            render(&mut replayed, "\"c1\"", 42, &logged);
            assert_eq!(replayed, live, "{} bytes of text", text.len());
        }
        let json = br#"{"type":"done","id":"c1","seq":43}"#;
        let mut live = BytesMut::new();
        crate::session::json::put_text_header(&mut live, json.len());
        live.extend_from_slice(json);
        let mut replayed = BytesMut::new();
        render(&mut replayed, "\"c1\"", 43, json);
        assert_eq!(replayed, live);
    }
}
