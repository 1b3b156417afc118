//! One generation's log in this process's memory: the embedded store's unit.
//!
//! The shard that runs the generation appends to it in place (under an uncontended lock, with
//! the generation's other state hot in its cache); the state thread only looks it up, trims it
//! and drops it. Nothing per message crosses a thread: that hand-off (a batch, then a cold
//! per-generation lookup on the state thread) cost the embedded store a third of the serving
//! path's throughput.
//!
//! A message is one record in one buffer: its text's length (LEB128), its token count
//! (LEB128), the text, then the tokens (`u32` little-endian) — about a dozen bytes for a
//! token delta. Every [`MARK_EVERY`]th record's offset is kept, so a lookup scans at most that
//! many records to find a seq.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use super::Appended;

/// A generation's log, shared by its shard (the writer) and the state thread.
pub type LocalLog = Arc<Mutex<GenLog>>;

/// Records between two kept offsets.
const MARK_EVERY: u64 = 64;
/// Bytes a new log has room for (growing from empty reallocates at every doubling, on the
/// shard's busiest path).
const ROOM: usize = 512;
/// What a new log holds ([`GenLog::held`]).
pub const NEW_LOG_BYTES: usize = ROOM;
/// Bytes counted for a log besides its buffers.
pub const LOG_OVERHEAD: usize = 160;

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
}

impl GenLog {
    pub fn new(epoch: u64) -> Self {
        GenLog {
            epoch,
            trimmed: 0,
            last_seq: 0,
            done: false,
            broken: false,
            closed: false,
            followed: false,
            buf: Vec::with_capacity(ROOM),
            live: 0,
            marks: Vec::new(),
            mark_base: 1,
            trimmed_tokens: Vec::new(),
        }
    }

    pub fn shared(epoch: u64) -> LocalLog {
        Arc::new(Mutex::new(GenLog::new(epoch)))
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
        if self.closed {
            return Appended::Gone;
        }
        if epoch != self.epoch {
            return Appended::Fenced;
        }
        if seq <= self.last_seq {
            return Appended::Duplicate;
        }
        if seq != self.last_seq + 1 || self.broken || self.done {
            self.broken = true;
            return Appended::Gap;
        }
        if (seq - self.mark_base).is_multiple_of(MARK_EVERY) {
            self.marks.push(self.buf.len());
        }
        let len = head.len() + body.len();
        // One growth per record at most (amortized: the buffer doubles).
        self.buf.reserve(len + tokens.len() * 4 + 20);
        put_len(&mut self.buf, len);
        put_len(&mut self.buf, tokens.len());
        // Most messages are a tag byte, a few bytes of text and one token: a call to memcpy
        // per part costs more than the copy.
        match head {
            [] => {}
            [b] => self.buf.push(*b),
            _ => self.buf.extend_from_slice(head),
        }
        if body.len() <= 16 {
            self.buf.extend(body.iter().copied());
        } else {
            self.buf.extend_from_slice(body);
        }
        for t in tokens {
            self.buf.extend_from_slice(&t.to_le_bytes());
        }
        self.last_seq = seq;
        self.done = done;
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
            let (len, at) = get_len(&self.buf, off)?;
            let (ntok, at) = get_len(&self.buf, at)?;
            let text = self.buf.get(at..at.checked_add(len)?)?;
            let toks_end = (at + len).checked_add(ntok.checked_mul(4)?)?;
            let toks = self.buf.get(at + len..toks_end)?;
            off = toks_end;
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
            out.extend(
                toks.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        out
    }

    /// Drops messages up to `upto` (their tokens are kept for a takeover).
    pub fn trim(&mut self, upto: u64) {
        let upto = upto.min(self.last_seq);
        if upto <= self.trimmed {
            return;
        }
        let mut toks = Vec::new();
        for (_, _, t) in self.records(self.trimmed + 1).take_while(|r| r.0 <= upto) {
            toks.extend(
                t.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        self.trimmed_tokens.extend(toks);
        self.trimmed = upto;
        self.live = self.offset_of(upto + 1).unwrap_or(self.buf.len());
        if self.live * 2 >= self.buf.len() {
            self.compact();
        }
    }

    /// Where record `seq`'s bytes start.
    fn offset_of(&self, seq: u64) -> Option<usize> {
        let k = (seq.checked_sub(self.mark_base)? / MARK_EVERY) as usize;
        let (mut s, mut off) = (self.mark_base + k as u64 * MARK_EVERY, *self.marks.get(k)?);
        while s < seq {
            let (len, at) = get_len(&self.buf, off)?;
            let (ntok, at) = get_len(&self.buf, at)?;
            off = at + len + ntok * 4;
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
            let Some((len, at)) = get_len(&self.buf, off) else {
                break;
            };
            let Some((ntok, at)) = get_len(&self.buf, at) else {
                break;
            };
            off = at + len + ntok * 4;
            seq += 1;
        }
        if self.buf.capacity() > 2 * self.buf.len() + ROOM {
            self.buf.shrink_to(self.buf.len() + self.buf.len() / 2);
        }
        self.marks.shrink_to_fit();
    }

    /// Expired or evicted: frees the buffers and refuses further appends.
    pub fn close(&mut self) {
        self.closed = true;
        self.buf = Vec::new();
        self.marks = Vec::new();
        self.trimmed_tokens = Vec::new();
        self.live = 0;
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
        let mut g = GenLog::new(1);
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
        let mut open = GenLog::new(2);
        assert_eq!(open.append(1, 1, &[], b"x", &[], false), Appended::Fenced);
        assert_eq!(open.append(2, 2, &[], b"x", &[], false), Appended::Gap);
        assert!(open.broken);
        g.close();
        assert_eq!(g.append(1, 4, &[], b"x", &[], false), Appended::Gone);
    }
}
