//! The embedded store: the logs in this process's memory (resume on the same instance only).
//!
//! Bounded twice: a log expires `resume_ttl` after its last write, and when the logs together
//! pass `memory_store_max_mb` the ones closest to expiry are evicted first (a resume of an
//! evicted generation is `unknown_id`; an owner whose log was evicted marks it not resumable).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Appended, Batch, Claim, Claimed, Found, GenId, Lease, Lookup, Renewed, Start, StateStore,
    StoreError, Ttls,
};

/// How often expired logs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A session outlives its generations' logs by up to this much: extending it on every append
/// would cost a second map lookup per message; this way it is once per generation per slack.
const SESSION_SLACK: Duration = Duration::from_millis(500);
/// Messages a new log has room for before it grows (growing by doubling from a few frees and
/// allocates again at every step, on the state thread's busiest path).
const LOG_ROOM: usize = 64;
/// Bytes counted per message besides its text (its place in the generation's index).
const MSG_OVERHEAD: usize = 16;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The shards' batches as they came (each one buffer of message texts), kept while any message
/// in them is: storing a message costs an index entry, not a copy into a per-generation buffer
/// (that copy, a cache miss per message, was most of the store's cost).
#[derive(Default)]
struct Chunks {
    /// The id of `slots[0]`.
    base: u64,
    /// A chunk's texts and how many of its messages are still held (`None`: freed).
    slots: VecDeque<Option<(Bytes, u32)>>,
}

impl Chunks {
    /// The id the next chunk gets.
    fn next_id(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    fn add(&mut self, data: Bytes, live: u32) {
        self.slots.push_back(Some((data, live)));
    }

    fn slot(&mut self, id: u64) -> Option<&mut Option<(Bytes, u32)>> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(i)
    }

    fn get(&self, id: u64) -> Option<&Bytes> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        self.slots.get(i)?.as_ref().map(|(b, _)| b)
    }

    /// `n` messages of chunk `id` are dropped; returns the bytes freed.
    fn release(&mut self, id: u64, n: u32) -> usize {
        let Some(slot) = self.slot(id) else {
            return 0;
        };
        let freed = match slot {
            Some((_, live)) if *live > n => {
                *live -= n;
                0
            }
            Some(_) => slot.take().map_or(0, |(b, _)| b.len()),
            None => 0,
        };
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        freed
    }
}

/// Where one message's text is: chunk id, offset, length.
type Span = (u64, u32, u32);

/// A generation's messages: an index into the chunks.
#[derive(Default)]
struct Log {
    spans: Vec<Span>,
    /// The seq of `spans[0]`.
    first: u64,
    /// Messages at the front already trimmed (compacted away once they are half the log).
    dead: usize,
}

impl Log {
    /// Messages with seq > `after`, at most `limit`.
    fn after(&self, chunks: &Chunks, after: u64, limit: usize) -> Vec<(u64, Bytes)> {
        let from = (after + 1).max(self.first + self.dead as u64);
        let skip = (from - self.first) as usize;
        self.spans
            .iter()
            .enumerate()
            .skip(skip)
            .take(limit)
            .filter_map(|(i, &(id, off, len))| {
                let text = chunks.get(id)?.slice(off as usize..(off + len) as usize);
                Some((self.first + i as u64, text))
            })
            .collect()
    }

    /// Drops messages up to `upto`; returns the chunk bytes freed and the index bytes dropped.
    fn trim(&mut self, upto: u64, chunks: &mut Chunks) -> (usize, usize) {
        let held_from = self.first + self.dead as u64;
        if upto < held_from {
            return (0, 0);
        }
        let n = ((upto - held_from + 1) as usize).min(self.spans.len() - self.dead);
        let freed = (
            release(&self.spans[self.dead..self.dead + n], chunks),
            n * MSG_OVERHEAD,
        );
        self.dead += n;
        if self.dead * 2 >= self.spans.len() {
            self.spans.drain(..self.dead);
            self.first += self.dead as u64;
            self.dead = 0;
        }
        freed
    }

    /// Drops every message held; returns the chunk bytes freed.
    fn clear(&mut self, chunks: &mut Chunks) -> usize {
        let freed = release(&self.spans[self.dead..], chunks);
        self.spans = Vec::new();
        self.dead = 0;
        freed
    }
}

/// Releases the messages at `spans` from their chunks (runs of one chunk at a time).
fn release(spans: &[Span], chunks: &mut Chunks) -> usize {
    let mut freed = 0;
    let mut i = 0;
    while i < spans.len() {
        let id = spans[i].0;
        let run = spans[i..].iter().take_while(|s| s.0 == id).count();
        freed += chunks.release(id, run as u32);
        i += run;
    }
    freed
}

struct Gen {
    session: Arc<str>,
    /// The session's expiry as this generation last extended it.
    session_until: Instant,
    epoch: u64,
    lease_until: Instant,
    request: Bytes,
    log: Log,
    last_seq: u64,
    trimmed: u64,
    tokens: Vec<u32>,
    done: bool,
    broken: bool,
    cancel: bool,
    watched_at: Option<Instant>,
    expires: Instant,
    bytes: usize,
}

pub struct MemoryStore {
    gens: HashMap<GenId, Gen>,
    /// Generations in start order: the sweep and the eviction take from the front.
    order: VecDeque<GenId>,
    sessions: HashMap<Arc<str>, ([u8; 32], Instant)>,
    chunks: Chunks,
    ttls: Ttls,
    max_bytes: usize,
    bytes: usize,
    last_sweep: Instant,
}

impl MemoryStore {
    pub fn new(ttls: Ttls, max_bytes: usize) -> Self {
        MemoryStore {
            gens: HashMap::default(),
            order: VecDeque::new(),
            sessions: HashMap::default(),
            chunks: Chunks::default(),
            ttls,
            max_bytes,
            bytes: 0,
            last_sweep: Instant::now(),
        }
    }

    /// Bytes the logs hold now (chunks count whole while any message in them is held).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops expired logs from the front of the start order (a log that was extended keeps the
    /// ones behind it waiting until it expires too; the byte cap bounds memory meanwhile).
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        while let Some(front) = self.order.front() {
            match self.gens.get(front) {
                Some(g) if g.expires > now => break,
                Some(_) => {
                    if let Some(g) = self.gens.remove(front) {
                        self.drop_gen(g);
                    }
                }
                None => {}
            }
            self.order.pop_front();
        }
        self.sessions.retain(|_, (_, exp)| *exp > now);
    }

    /// Evicts the oldest logs until the cap holds.
    fn evict_over_cap(&mut self) {
        while self.bytes > self.max_bytes {
            let Some(victim) = self.order.pop_front() else {
                return;
            };
            if let Some(g) = self.gens.remove(&victim) {
                self.drop_gen(g);
            }
        }
    }

    /// Forgets a removed generation's bytes (and frees the chunks only it still held).
    fn drop_gen(&mut self, mut g: Gen) {
        self.bytes -= g.bytes;
        self.bytes -= g.log.clear(&mut self.chunks);
    }

    /// Applies entry `i` of `b`, whose texts become chunk `chunk`; returns the answer and how
    /// many messages it logged.
    fn append(&mut self, b: &Batch, i: usize, chunk: u64, now: Instant) -> (Appended, u32) {
        let a = &b.gens[i];
        let Some(g) = self.gens.get_mut(&a.gen).filter(|g| g.expires > now) else {
            return (Appended::Gone, 0);
        };
        if g.epoch != a.epoch {
            return (Appended::Fenced, 0);
        }
        if a.count == 0 || a.last_seq() <= g.last_seq {
            return (Appended::Duplicate, 0);
        }
        if a.first_seq != g.last_seq + 1 || g.broken || g.done {
            g.broken = true;
            return (Appended::Gap, 0);
        }
        let mut added = 0;
        for (off, len, tokens) in b.spans(i) {
            g.log.spans.push((chunk, off, len));
            g.tokens.extend_from_slice(tokens);
            added += MSG_OVERHEAD + tokens.len() * 4;
        }
        g.bytes += added;
        self.bytes += added;
        g.last_seq = a.last_seq();
        g.done = a.done;
        g.expires = now + self.ttls.log;
        if g.expires > g.session_until {
            g.session_until = g.expires + SESSION_SLACK;
            if let Some(s) = self.sessions.get_mut(&g.session) {
                s.1 = s.1.max(g.session_until);
            }
        }
        (Appended::Ok, a.count)
    }
}

impl StateStore for MemoryStore {
    fn write(&mut self, starts: &[Start], batches: &[Batch]) -> Result<Vec<Appended>, StoreError> {
        let now = Instant::now();
        self.sweep(now);
        for s in starts {
            let expires = now + self.ttls.log;
            let session_until = expires + SESSION_SLACK;
            self.sessions
                .insert(s.session.clone(), (s.token_hash, session_until));
            let bytes = s.request.len() + s.gen.len() + 256;
            if let Some(old) = self.gens.insert(
                s.gen.clone(),
                Gen {
                    session: s.session.clone(),
                    session_until,
                    epoch: 1,
                    lease_until: now + self.ttls.lease,
                    request: s.request.clone(),
                    log: Log {
                        first: 1,
                        spans: Vec::with_capacity(LOG_ROOM),
                        ..Log::default()
                    },
                    last_seq: 0,
                    trimmed: 0,
                    tokens: Vec::with_capacity(LOG_ROOM),
                    done: false,
                    broken: false,
                    cancel: false,
                    watched_at: None,
                    expires,
                    bytes,
                },
            ) {
                self.drop_gen(old);
            }
            self.order.push_back(s.gen.clone());
            self.bytes += bytes;
        }
        let mut out = Vec::with_capacity(batches.iter().map(|b| b.gens.len()).sum());
        for b in batches {
            let chunk = self.chunks.next_id();
            let mut live = 0;
            for i in 0..b.gens.len() {
                let (r, n) = self.append(b, i, chunk, now);
                out.push(r);
                live += n;
            }
            if live > 0 {
                self.chunks.add(b.data().clone(), live);
                self.bytes += b.data().len();
            }
        }
        self.evict_over_cap();
        Ok(out)
    }

    fn renew(&mut self, leases: &[Lease]) -> Result<Vec<Renewed>, StoreError> {
        let now = Instant::now();
        Ok(leases
            .iter()
            .map(|l| match self.gens.get_mut(&l.gen) {
                Some(g) if g.epoch == l.epoch => {
                    g.lease_until = now + self.ttls.lease;
                    Renewed {
                        fenced: false,
                        cancel: g.cancel,
                        watched: g
                            .watched_at
                            .is_some_and(|t| now.duration_since(t) < self.ttls.lease),
                    }
                }
                _ => Renewed {
                    fenced: true,
                    ..Renewed::default()
                },
            })
            .collect())
    }

    fn release(&mut self, leases: &[Lease]) -> Result<(), StoreError> {
        let now = Instant::now();
        for l in leases {
            if let Some(g) = self.gens.get_mut(&l.gen) {
                if g.epoch == l.epoch {
                    g.lease_until = now;
                }
            }
        }
        Ok(())
    }

    fn lookup(
        &mut self,
        session: &str,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Lookup, StoreError> {
        let now = Instant::now();
        self.sweep(now);
        let Some((hash, _)) = self.sessions.get(session).filter(|(_, exp)| *exp > now) else {
            return Ok(Lookup::default());
        };
        let gen_name = super::gen_id(session, id);
        let gen = self
            .gens
            .get_mut(&gen_name)
            .filter(|g| g.expires > now)
            .map(|g| {
                g.watched_at = Some(now);
                Found {
                    msgs: g.log.after(&self.chunks, after, limit),
                    last_seq: g.last_seq,
                    trimmed: g.trimmed,
                    done: g.done,
                    broken: g.broken,
                    epoch: g.epoch,
                    lease_expired: !g.done && g.lease_until <= now,
                }
            });
        Ok(Lookup {
            session: Some(*hash),
            gen,
        })
    }

    fn claim(&mut self, gen: &str, epoch: u64, _owner: &str) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let Some(g) = self.gens.get_mut(gen).filter(|g| g.expires > now) else {
            return Ok(Claim::Over);
        };
        if g.done || g.broken {
            return Ok(Claim::Over);
        }
        if g.epoch != epoch || g.lease_until > now {
            return Ok(Claim::Busy);
        }
        g.epoch += 1;
        g.lease_until = now + self.ttls.lease;
        g.cancel = false;
        Ok(Claim::Claimed(Claimed {
            epoch: g.epoch,
            request: g.request.clone(),
            tokens: g.tokens.clone(),
            last_seq: g.last_seq,
        }))
    }

    fn cancel(&mut self, gen: &str) -> Result<(), StoreError> {
        if let Some(g) = self.gens.get_mut(gen) {
            g.cancel = true;
        }
        Ok(())
    }

    fn trim(&mut self, gen: &str, upto: u64) -> Result<(), StoreError> {
        if let Some(g) = self.gens.get_mut(gen) {
            let (chunk, index) = g.log.trim(upto.min(g.last_seq), &mut self.chunks);
            g.bytes -= index;
            self.bytes -= chunk + index;
            g.trimmed = g.trimmed.max(upto.min(g.last_seq));
        }
        Ok(())
    }

    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError> {
        if let Some(g) = self.gens.get_mut(gen) {
            g.broken = true;
        }
        Ok(())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
