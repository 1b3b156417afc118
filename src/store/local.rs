//! One generation's log in this process's memory: the embedded store's unit.
//!
//! The shard that runs the generation writes it: each message is encoded into the
//! generation's own staging buffer ([`Records`], on the shard, no lock), and the staged run is
//! published into the shared log under its lock every [`PUBLISH_EVERY`] messages, at the
//! `done`, and at every shard tick (10 ms). The state thread only looks logs up, trims and drops
//! them. Nothing per message crosses a thread or takes a lock: handing messages to the state
//! thread (a batch, then a cold per-generation lookup there) cost the embedded store a third of
//! the serving path's throughput, and a lock per message a tenth (a locked instruction waits
//! for the delta frame's stores to drain).
//!
//! A message is one record in one buffer: a token delta's is its text's length (one byte),
//! the text and its token (LEB128), about ten bytes; see [`encode`]. Every [`MARK_EVERY`]th
//! record's offset is kept, so a lookup scans at most that many records to find a seq.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use super::Appended;

/// A generation's log, shared by its shard (the writer) and the state thread.
pub type LocalLog = Arc<Mutex<GenLog>>;

/// Staged messages a shard publishes at once (it also publishes at the `done` and every tick).
pub const PUBLISH_EVERY: u32 = 32;
/// Records between two kept offsets.
const MARK_EVERY: u64 = 64;
/// Bytes a new log has room for unless told (growing from empty reallocates — and copies — at
/// every doubling, on the shard's busiest path).
const ROOM: usize = 512;
/// Bytes of log a generated token takes, at most about (a token delta's record is a length
/// byte, the tag, ~5 bytes of text and 2–3 of token; a chunked message covers several tokens
/// with fewer bytes each). A log that ends well short of its room gives the rest back.
pub const BYTES_PER_TOKEN: usize = 12;
/// The most room a new log is given up front.
const ROOM_MAX: usize = 64 << 10;
/// Bytes counted for a log besides its buffers.
pub const LOG_OVERHEAD: usize = 160;

/// What the logs hold together, kept by the logs themselves (the store's cap reads it).
#[derive(Debug, Default)]
pub struct LogCounters {
    /// Bytes held ([`GenLog::held`] summed, plus the store's metadata).
    pub bytes: AtomicI64,
    /// Messages appended.
    pub appended: AtomicU64,
}

impl LogCounters {
    fn grew(&self, before: usize, after: usize) {
        let d = after as i64 - before as i64;
        if d != 0 {
            self.bytes.fetch_add(d, Ordering::Relaxed);
        }
    }
}

/// Messages encoded as log records, not yet in a log (a shard's staging for one generation).
#[derive(Debug, Default)]
pub struct Records {
    buf: Vec<u8>,
    n: u32,
    first_seq: u64,
    done: bool,
}

impl Records {
    /// Adds message `seq` (its text is `head` then `body`) and the tokens it covers; the seqs
    /// of one run are consecutive.
    pub fn push(&mut self, seq: u64, head: &[u8], body: &[u8], tokens: &[u32], done: bool) {
        if self.n == 0 {
            self.first_seq = seq;
        }
        encode(&mut self.buf, head, body, tokens);
        self.n += 1;
        self.done = done;
    }

    pub fn len(&self) -> u32 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Forgets the run (keeping the buffer).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.n = 0;
        self.done = false;
    }
}

/// A shard's staging: the records of all its generations back to back, each after the offset
/// of the previous one of its generation (a chain per generation, [`Run`]). Writing here is
/// sequential and stays in the shard's cache; a staging buffer per generation cost a cache
/// miss per message. Every tick the shard publishes every run, then clears the buffer.
#[derive(Debug, Default)]
pub struct Stage {
    buf: Vec<u8>,
    /// A run's offsets, newest first, while it is published.
    chain: Vec<u32>,
}

/// A generation's staged messages in its shard's [`Stage`].
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Where its newest record's link is ([`NO_RECORD`]: none).
    last: u32,
    n: u32,
    first_seq: u64,
    done: bool,
}

const NO_RECORD: u32 = u32::MAX;

/// Staged bytes past which a stage takes no more (offsets are `u32`; a tick stages far less).
const STAGE_MAX: usize = 1 << 30;

/// The stage is full.
#[derive(Debug)]
pub struct Full;

impl Default for Run {
    fn default() -> Self {
        Run {
            last: NO_RECORD,
            n: 0,
            first_seq: 0,
            done: false,
        }
    }
}

impl Run {
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

impl Stage {
    /// Stages message `seq` of `run` (its text is `head` then `body`) and the tokens it
    /// covers. True when the run was empty (the shard lists it for the next tick). A stage
    /// that is full (a tick that never came) refuses: the caller writes to the log directly.
    pub fn push(
        &mut self,
        run: &mut Run,
        seq: u64,
        head: &[u8],
        body: &[u8],
        tokens: &[u32],
        done: bool,
    ) -> Result<bool, Full> {
        if self.buf.len() > STAGE_MAX {
            return Err(Full);
        }
        let first = run.n == 0;
        if first {
            run.first_seq = seq;
        }
        let at = self.buf.len() as u32;
        self.buf.extend_from_slice(&run.last.to_le_bytes());
        encode(&mut self.buf, head, body, tokens);
        run.last = at;
        run.n += 1;
        run.done = done;
        Ok(first)
    }

    /// Publishes `run` into `log` (its records in seq order) and empties it.
    pub fn publish(&mut self, run: &mut Run, log: &mut GenLog, epoch: u64) -> Appended {
        self.chain.clear();
        let mut at = run.last;
        while at != NO_RECORD && self.chain.len() < run.n as usize {
            self.chain.push(at);
            let i = at as usize;
            at = match self.buf.get(i..i + 4) {
                Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                None => NO_RECORD,
            };
        }
        let buf = &self.buf;
        let records = self.chain.iter().rev().filter_map(|&at| {
            let start = at as usize + 4;
            let (_, _, end) = decode(buf, start)?;
            Some(&buf[start..end])
        });
        let r = log.append_records(epoch, run.first_seq, run.n, run.done, records);
        *run = Run::default();
        r
    }

    /// Forgets every staged record (each run was published, or its request is gone).
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

/// Appends one record. A token delta's (text under 128 bytes, one token) starts with its
/// text's length; any other starts with [`GENERAL`], then the text's length and the token count
/// (LEB128). Tokens are LEB128 too (two or three bytes for most vocabularies).
fn encode(buf: &mut Vec<u8>, head: &[u8], body: &[u8], tokens: &[u32]) {
    if let ([] | [_], true, [t]) = (head, body.len() <= 16, tokens) {
        // Built on the stack, copied once.
        let mut rec = [0u8; 24];
        rec[0] = (head.len() + body.len()) as u8;
        let mut n = 1;
        if let [h] = head {
            rec[1] = *h;
            n = 2;
        }
        for (d, s) in rec[n..].iter_mut().zip(body) {
            *d = *s;
        }
        n += body.len();
        let mut t = *t;
        while t >= 0x80 {
            rec[n] = (t as u8) | 0x80;
            t >>= 7;
            n += 1;
        }
        rec[n] = t as u8;
        buf.extend_from_slice(&rec[..=n]);
        return;
    }
    let len = head.len() + body.len();
    // One growth per record at most (amortized: the buffer doubles).
    buf.reserve(len + tokens.len() * 5 + 21);
    buf.push(GENERAL);
    put_len(buf, len);
    put_len(buf, tokens.len());
    buf.extend_from_slice(head);
    buf.extend_from_slice(body);
    for &t in tokens {
        put_len(buf, t as usize);
    }
}

/// The first byte of a record that is not a one-token delta of under 128 bytes.
const GENERAL: u8 = 0x80;

/// The record at `off`: its text, its tokens' bytes, and where the next record starts.
fn decode(buf: &[u8], off: usize) -> Option<(&[u8], &[u8], usize)> {
    let (len, ntok, at) = match *buf.get(off)? {
        GENERAL => {
            let (len, at) = get_len(buf, off + 1)?;
            let (ntok, at) = get_len(buf, at)?;
            (len, ntok, at)
        }
        b => (usize::from(b), 1, off + 1),
    };
    let text = buf.get(at..at.checked_add(len)?)?;
    let mut end = at + len;
    for _ in 0..ntok {
        end = get_len(buf, end)?.1;
    }
    Some((text, &buf[at + len..end], end))
}

/// The tokens of a record (as [`decode`] gave them).
fn tokens_of(mut toks: &[u8]) -> impl Iterator<Item = u32> + '_ {
    std::iter::from_fn(move || {
        let (t, end) = get_len(toks, 0)?;
        toks = toks.get(end..)?;
        u32::try_from(t).ok()
    })
}

#[derive(Debug)]
pub struct GenLog {
    pub epoch: u64,
    /// Messages up to this seq were trimmed (acknowledged).
    pub trimmed: u64,
    /// The highest logged seq.
    pub last_seq: u64,
    pub done: bool,
    /// Messages were lost on the way here (a gap): not resumable.
    pub broken: bool,
    /// Expired or evicted: appends are refused, the buffers are gone.
    closed: bool,
    /// A client on this instance follows it: its owner also hands each message to the state
    /// thread, which pushes it to the follower (set with the lookup that starts the follow).
    pub followed: bool,
    /// Records; those before `live` are trimmed (dropped when they are half the buffer).
    buf: Vec<u8>,
    live: usize,
    /// The offset of record `mark_base + k * MARK_EVERY` is `marks[k]`.
    marks: Vec<usize>,
    mark_base: u64,
    /// Tokens of trimmed messages (a takeover re-prefills every generated token).
    trimmed_tokens: Vec<u32>,
    counters: Arc<LogCounters>,
}

impl GenLog {
    /// A new log, counted in `counters` (its room included).
    pub fn new(epoch: u64, counters: Arc<LogCounters>) -> Self {
        Self::with_room(epoch, counters, ROOM)
    }

    /// A new log with room for about `room` bytes (up to [`ROOM_MAX`]): sized for the
    /// generation's `max_tokens`, it never reallocates (and copies) as it grows.
    pub fn with_room(epoch: u64, counters: Arc<LogCounters>, room: usize) -> Self {
        let buf = Vec::with_capacity(room.clamp(ROOM, ROOM_MAX));
        counters
            .bytes
            .fetch_add(buf.capacity() as i64, Ordering::Relaxed);
        GenLog {
            epoch,
            trimmed: 0,
            last_seq: 0,
            done: false,
            broken: false,
            closed: false,
            followed: false,
            buf,
            live: 0,
            marks: Vec::new(),
            mark_base: 1,
            trimmed_tokens: Vec::new(),
            counters,
        }
    }

    pub fn shared(epoch: u64, counters: Arc<LogCounters>, room: usize) -> LocalLog {
        Arc::new(Mutex::new(GenLog::with_room(epoch, counters, room)))
    }

    /// Memory the log holds (what the store's cap counts).
    pub fn held(&self) -> usize {
        self.buf.capacity() + self.marks.capacity() * 8 + self.trimmed_tokens.capacity() * 4
    }

    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Appends message `seq` (its text is `head` then `body`) and the tokens it covers.
    pub fn append(
        &mut self,
        epoch: u64,
        seq: u64,
        head: &[u8],
        body: &[u8],
        tokens: &[u32],
        done: bool,
    ) -> Appended {
        let mut one = Records::default();
        one.push(seq, head, body, tokens, done);
        self.publish(epoch, &one)
    }

    /// Appends a staged run of messages, all or none (a run partly logged already — a
    /// retry — adds the rest).
    pub fn publish(&mut self, epoch: u64, run: &Records) -> Appended {
        let mut off = 0;
        let records = std::iter::from_fn(|| {
            let (_, _, next) = decode(&run.buf, off)?;
            let r = &run.buf[off..next];
            off = next;
            Some(r)
        });
        self.append_records(epoch, run.first_seq, run.n, run.done, records)
    }

    /// Appends `n` records (one encoded message each) from seq `first_seq` on; the last one is
    /// the `done` when `done`. Records up to the log's last seq are skipped (a retry).
    fn append_records<'a>(
        &mut self,
        epoch: u64,
        first_seq: u64,
        n: u32,
        done: bool,
        records: impl Iterator<Item = &'a [u8]>,
    ) -> Appended {
        if self.closed {
            return Appended::Gone;
        }
        if epoch != self.epoch {
            return Appended::Fenced;
        }
        if n == 0 {
            return Appended::Duplicate;
        }
        let last = first_seq + u64::from(n) - 1;
        if last <= self.last_seq {
            return Appended::Duplicate;
        }
        if first_seq > self.last_seq + 1 || self.broken || self.done {
            self.broken = true;
            return Appended::Gap;
        }
        let held = self.held();
        let mut added = 0;
        for (seq, r) in (first_seq..=last).zip(records) {
            if seq <= self.last_seq {
                continue;
            }
            if (seq - self.mark_base).is_multiple_of(MARK_EVERY) {
                self.marks.push(self.buf.len());
            }
            self.buf.extend_from_slice(r);
            self.last_seq = seq;
            added += 1;
        }
        self.counters.appended.fetch_add(added, Ordering::Relaxed);
        if self.last_seq != last {
            // Fewer records than said: the log cannot be trusted past here.
            self.broken = true;
            self.counters.grew(held, self.held());
            return Appended::Gap;
        }
        self.done = done;
        if self.done && self.buf.capacity() > self.buf.len() + self.buf.len() / 2 {
            // Finished well short of its room: the rest is the next logs' room.
            self.buf.shrink_to_fit();
        }
        self.counters.grew(held, self.held());
        Appended::Ok
    }

    /// The records from seq `from` (at least the first live one) on: (seq, text, tokens).
    fn records(&self, from: u64) -> impl Iterator<Item = (u64, &[u8], &[u8])> + '_ {
        let from = from.max(self.trimmed + 1).max(self.mark_base);
        let k = ((from - self.mark_base) / MARK_EVERY) as usize;
        let (mut seq, mut off) = match self.marks.get(k) {
            Some(&off) => (self.mark_base + k as u64 * MARK_EVERY, off),
            None => (self.last_seq + 1, self.buf.len()),
        };
        std::iter::from_fn(move || loop {
            if seq > self.last_seq {
                return None;
            }
            let (text, toks, next) = decode(&self.buf, off)?;
            off = next;
            let s = seq;
            seq += 1;
            if s >= from {
                return Some((s, text, toks));
            }
        })
    }

    /// Messages with seq > `after`, at most `limit` (their texts share one buffer).
    pub fn after(&self, after: u64, limit: usize) -> Vec<(u64, Bytes)> {
        let mut texts = BytesMut::new();
        let mut spans = Vec::new();
        for (seq, text, _) in self.records(after.saturating_add(1)).take(limit) {
            spans.push((seq, texts.len(), text.len()));
            texts.extend_from_slice(text);
        }
        let texts = texts.freeze();
        spans
            .into_iter()
            .map(|(seq, off, len)| (seq, texts.slice(off..off + len)))
            .collect()
    }

    /// Every generated token the log covers, trimmed messages' included.
    pub fn tokens(&self) -> Vec<u32> {
        let mut out = self.trimmed_tokens.clone();
        for (_, _, toks) in self.records(0) {
            out.extend(tokens_of(toks));
        }
        out
    }

    /// Drops messages up to `upto` (their tokens are kept for a takeover).
    pub fn trim(&mut self, upto: u64) {
        let upto = upto.min(self.last_seq);
        if upto <= self.trimmed {
            return;
        }
        let held = self.held();
        let mut toks = Vec::new();
        for (_, _, t) in self.records(self.trimmed + 1).take_while(|r| r.0 <= upto) {
            toks.extend(tokens_of(t));
        }
        self.trimmed_tokens.extend(toks);
        self.trimmed = upto;
        self.live = self.offset_of(upto + 1).unwrap_or(self.buf.len());
        if self.live * 2 >= self.buf.len() {
            self.compact();
        }
        self.counters.grew(held, self.held());
    }

    /// Where record `seq`'s bytes start.
    fn offset_of(&self, seq: u64) -> Option<usize> {
        let k = (seq.checked_sub(self.mark_base)? / MARK_EVERY) as usize;
        let (mut s, mut off) = (self.mark_base + k as u64 * MARK_EVERY, *self.marks.get(k)?);
        while s < seq {
            off = decode(&self.buf, off)?.2;
            s += 1;
        }
        Some(off)
    }

    /// Drops the trimmed records' bytes and gives back room the log no longer needs.
    fn compact(&mut self) {
        self.buf.drain(..self.live);
        self.live = 0;
        self.mark_base = self.trimmed + 1;
        self.marks.clear();
        let mut off = 0;
        let mut seq = self.mark_base;
        while seq <= self.last_seq {
            if (seq - self.mark_base).is_multiple_of(MARK_EVERY) {
                self.marks.push(off);
            }
            let Some((_, _, next)) = decode(&self.buf, off) else {
                break;
            };
            off = next;
            seq += 1;
        }
        if self.buf.capacity() > 2 * self.buf.len() + ROOM {
            self.buf.shrink_to(self.buf.len() + self.buf.len() / 2);
        }
        self.marks.shrink_to_fit();
    }

    /// Expired or evicted: frees the buffers and refuses further appends.
    pub fn close(&mut self) {
        self.counters.grew(self.held(), 0);
        self.closed = true;
        self.buf = Vec::new();
        self.marks = Vec::new();
        self.trimmed_tokens = Vec::new();
        self.live = 0;
    }
}

impl Drop for GenLog {
    fn drop(&mut self) {
        // A log that never reached the store (or was closed: it holds nothing then).
        self.counters.grew(self.held(), 0);
    }
}

fn put_len(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// A length at `off`, and where its bytes end.
fn get_len(buf: &[u8], mut off: usize) -> Option<(usize, usize)> {
    let mut n = 0usize;
    let mut shift = 0;
    loop {
        let b = *buf.get(off)?;
        off += 1;
        n |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b < 0x80 {
            return Some((n, off));
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u64) -> GenLog {
        let mut g = GenLog::new(1, Arc::default());
        for seq in 1..=n {
            let text = format!("m{seq}").repeat((seq % 50) as usize);
            let r = g.append(1, seq, &[0], text.as_bytes(), &[seq as u32], seq == n);
            assert_eq!(r, Appended::Ok);
        }
        g
    }

    fn text(seq: u64) -> Bytes {
        let mut t = vec![0u8];
        t.extend_from_slice(format!("m{seq}").repeat((seq % 50) as usize).as_bytes());
        Bytes::from(t)
    }

    #[test]
    fn replays_from_any_seq_across_marks() {
        let g = filled(300);
        for after in [0, 1, 63, 64, 65, 127, 128, 200, 299, 300] {
            let got = g.after(after, 1000);
            let want: Vec<(u64, Bytes)> = (after + 1..=300).map(|s| (s, text(s))).collect();
            assert_eq!(got, want, "after {after}");
        }
        assert_eq!(g.after(10, 3).len(), 3);
        assert_eq!(g.tokens(), (1..=300).map(|s| s as u32).collect::<Vec<_>>());
    }

    #[test]
    fn staged_runs_replay_like_single_appends() {
        let counters = Arc::new(LogCounters::default());
        let mut g = GenLog::new(1, counters.clone());
        let mut run = Records::default();
        let mut seq = 1;
        for size in [1u64, 5, 64, 3, 130, 1, 96] {
            for _ in 0..size {
                let t = text(seq);
                run.push(seq, &t[..1], &t[1..], &[seq as u32], seq == 300);
                seq += 1;
            }
            assert_eq!(g.publish(1, &run), Appended::Ok);
            // A retry of the same run changes nothing.
            assert_eq!(g.publish(1, &run), Appended::Duplicate);
            run.clear();
        }
        assert_eq!(g.last_seq, 300);
        assert!(g.done);
        let single = filled(300);
        for after in [0, 63, 64, 70, 128, 199, 255, 299] {
            assert_eq!(
                g.after(after, 1000),
                single.after(after, 1000),
                "after {after}"
            );
        }
        assert_eq!(g.tokens(), single.tokens());
        assert_eq!(counters.appended.load(Ordering::Relaxed), 300);
        assert_eq!(counters.bytes.load(Ordering::Relaxed), g.held() as i64);
        drop(g);
        assert_eq!(
            counters.bytes.load(Ordering::Relaxed),
            0,
            "a dropped log is uncounted"
        );
    }

    #[test]
    fn interleaved_stage_runs_publish_in_seq_order() {
        let counters = Arc::new(LogCounters::default());
        let mut logs: Vec<GenLog> = (0..3).map(|_| GenLog::new(1, counters.clone())).collect();
        let mut runs = [Run::default(); 3];
        let mut stage = Stage::default();
        let mut next = [1u64; 3];
        // Three generations interleaved, published at different moments, the stage cleared
        // after every "tick" in which each run was published.
        for tick in 0..20u64 {
            for i in 0..((tick * 7) % 40 + 1) {
                let g = ((i * 5 + tick) % 3) as usize;
                let seq = next[g];
                let t = text(seq);
                let listed = stage
                    .push(&mut runs[g], seq, &t[..1], &t[1..], &[seq as u32], false)
                    .expect("room");
                assert_eq!(listed, runs[g].n == 1);
                next[g] += 1;
                if seq % 11 == 0 {
                    // Published early (a done or a follower would do this).
                    assert_eq!(stage.publish(&mut runs[g], &mut logs[g], 1), Appended::Ok);
                }
            }
            for g in 0..3 {
                let r = stage.publish(&mut runs[g], &mut logs[g], 1);
                assert!(matches!(r, Appended::Ok | Appended::Duplicate), "{r:?}");
            }
            stage.clear();
        }
        for g in 0..3 {
            let n = next[g] - 1;
            let want: Vec<(u64, Bytes)> = (1..=n).map(|s| (s, text(s))).collect();
            assert_eq!(logs[g].after(0, 10_000), want, "generation {g}");
            assert_eq!(
                logs[g].tokens(),
                (1..=n).map(|s| s as u32).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn tokens_of_any_size_in_either_record_form() {
        let ids = [0, 127, 128, 16_383, 16_384, 151_000, u32::MAX];
        let mut g = GenLog::new(1, Arc::default());
        for (i, &t) in ids.iter().enumerate() {
            let seq = i as u64 + 1;
            // Short texts take the one-byte form; the rest (and multi-token) the general one.
            let body = if i % 2 == 0 {
                "ab".to_string()
            } else {
                "x".repeat(200)
            };
            assert_eq!(
                g.append(1, seq, &[0], body.as_bytes(), &[t], false),
                Appended::Ok
            );
        }
        g.append(1, 8, &[], b"", &ids, false);
        g.append(1, 9, &[], b"{}", &[], true);
        let mut want = ids.to_vec();
        want.extend_from_slice(&ids);
        assert_eq!(g.tokens(), want);
        assert_eq!(g.after(8, 10), vec![(9, Bytes::from_static(b"{}"))]);
        assert_eq!(g.after(0, 1)[0].1.len(), 3);
    }

    #[test]
    fn trims_keep_the_rest_and_every_token() {
        let mut g = filled(300);
        for upto in [5, 64, 65, 190, 250, 299] {
            g.trim(upto);
            let got = g.after(0, 1000);
            let want: Vec<(u64, Bytes)> = (upto + 1..=300).map(|s| (s, text(s))).collect();
            assert_eq!(got, want, "after trimming to {upto}");
            assert_eq!(g.tokens(), (1..=300).map(|s| s as u32).collect::<Vec<_>>());
        }
        g.trim(300);
        assert!(g.after(0, 10).is_empty());
        assert!(
            g.held() < 4096,
            "{} bytes held after trimming all",
            g.held()
        );
    }

    #[test]
    fn refuses_gaps_stale_epochs_and_closed_logs() {
        let mut g = filled(3);
        assert_eq!(g.append(1, 3, &[], b"x", &[], false), Appended::Duplicate);
        let mut open = GenLog::new(2, Arc::default());
        assert_eq!(open.append(1, 1, &[], b"x", &[], false), Appended::Fenced);
        assert_eq!(open.append(2, 2, &[], b"x", &[], false), Appended::Gap);
        assert!(open.broken);
        g.close();
        assert_eq!(g.append(1, 4, &[], b"x", &[], false), Appended::Gone);
    }
}
