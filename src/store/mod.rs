//! The state store (SPEC 1 "state thread", SPEC 4 "Resume from last offset").
//!
//! Every resumable generation has one **log**: the messages it sent (`delta`s, then `done`),
//! addressed by `seq`, plus its metadata — owner instance, a lease with an epoch, the request
//! (prompt token ids, sampling parameters with the seed, stream mode) and the generated token
//! ids that the logged messages cover. A client that lost its connection resumes from the log on
//! any instance sharing the store; when the owner's lease expired, the instance the client
//! reached claims the generation (epoch compare-and-set) and carries it on.
//!
//! Two implementations of [`StateStore`]: [`memory::MemoryStore`] (embedded, one instance) and
//! [`redis::RedisStore`] (`--redis-url`, shared). Both are used only on the state thread
//! ([`thread`]); shards talk to it through bounded queues and never wait for it. With the
//! embedded store a shard appends to its generations' logs ([`local::GenLog`]) in place and
//! queues only what the state thread must see (new generations, messages for followers).

pub mod local;
pub mod memory;
pub mod redis;
pub mod thread;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A generation's store-wide name: `<session>/<request id>`.
pub type GenId = Arc<str>;

/// Composes the store name of request `id` of `session`.
pub fn gen_id(session: &str, id: &str) -> GenId {
    let mut s = String::with_capacity(session.len() + 1 + id.len());
    s.push_str(session);
    s.push('/');
    s.push_str(id);
    s.into()
}

/// SHA-256 of a resume token: the store keeps only this.
pub fn token_hash(token: &str) -> [u8; 32] {
    token_hash_of(token.as_bytes())
}

/// [`token_hash`] of raw bytes (an API key as it came in a header).
pub fn token_hash_of(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// Compares two token hashes without an early exit.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new generation's metadata; its first lease (epoch 1) starts now.
#[derive(Clone, Debug)]
pub struct Start {
    pub gen: GenId,
    pub session: Arc<str>,
    pub token_hash: [u8; 32],
    pub owner: Arc<str>,
    /// What a new owner needs to carry the generation on (JSON, see `session::resume`).
    pub request: Bytes,
    /// The log its shard appends to (embedded store); `None`: the store makes it.
    pub log: Option<local::LocalLog>,
    /// The request that waits until the log exists in the store (a background response's
    /// `queued` answer: its id must be readable on every instance once the client has it).
    pub ack: Option<crate::engine::SeqKey>,
}

/// One shard dispatch's log writes: the messages of every generation that sent any, their
/// texts back to back in one buffer and their tokens in another — nothing is allocated per
/// message, and the shard writes it front to back.
///
/// A generation has one entry per run of consecutive seqs ([`BatchGen`]); its messages are
/// linked in seq order through [`MsgRef::next`].
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub gens: Vec<BatchGen>,
    msgs: Vec<MsgRef>,
    data: Bytes,
    tokens: Vec<u32>,
}

/// Messages `first_seq..first_seq + count` of one generation in a [`Batch`].
#[derive(Clone, Debug)]
pub struct BatchGen {
    pub gen: GenId,
    pub epoch: u64,
    pub first_seq: u64,
    pub count: u32,
    /// The last message is the `done`.
    pub done: bool,
    head: u32,
    tail: u32,
}

impl BatchGen {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count) - 1
    }
}

#[derive(Clone, Copy, Debug)]
struct MsgRef {
    off: u32,
    len: u32,
    tok_off: u32,
    tok_len: u32,
    /// The next message of the same entry (`u32::MAX`: none).
    next: u32,
}

const NONE: u32 = u32::MAX;

impl Batch {
    /// Each message of entry `i` in seq order: (offset, length) in [`Self::data`] and the
    /// tokens it covers.
    pub fn spans(&self, i: usize) -> impl Iterator<Item = (u32, u32, &[u32])> + '_ {
        self.refs(i).map(|m| {
            let tokens = &self.tokens[m.tok_off as usize..(m.tok_off + m.tok_len) as usize];
            (m.off, m.len, tokens)
        })
    }

    /// Each message of entry `i` in seq order: its text and the tokens it covers.
    pub fn msgs(&self, i: usize) -> impl Iterator<Item = (&[u8], &[u32])> + '_ {
        self.spans(i)
            .map(|(off, len, t)| (&self.data[off as usize..(off + len) as usize], t))
    }

    /// Entry `i`'s texts as shared slices of the batch (for the followers it is pushed to).
    pub fn texts(&self, i: usize) -> impl Iterator<Item = Bytes> + '_ {
        self.spans(i)
            .map(|(off, len, _)| self.data.slice(off as usize..(off + len) as usize))
    }

    /// The texts of every message, back to back.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    fn refs(&self, i: usize) -> impl Iterator<Item = MsgRef> + '_ {
        let mut at = self.gens.get(i).map_or(NONE, |g| g.head);
        std::iter::from_fn(move || {
            let m = *self.msgs.get(at as usize)?;
            at = m.next;
            Some(m)
        })
    }

    /// A batch of one entry (tests, and writes that are not a shard's).
    pub fn of(
        gen: &GenId,
        epoch: u64,
        first_seq: u64,
        msgs: &[&[u8]],
        tokens: &[&[u32]],
        done: bool,
    ) -> Batch {
        let mut b = BatchBuilder::default();
        let g = b.open(gen, epoch, first_seq);
        for (i, m) in msgs.iter().enumerate() {
            let last = i + 1 == msgs.len();
            b.push(
                g,
                &[],
                m,
                tokens.get(i).copied().unwrap_or(&[]),
                done && last,
            );
        }
        b.take(None)
    }
}

/// Builds a [`Batch`] message by message.
#[derive(Default)]
pub struct BatchBuilder {
    gens: Vec<BatchGen>,
    msgs: Vec<MsgRef>,
    data: Vec<u8>,
    tokens: Vec<u32>,
}

impl BatchBuilder {
    /// Opens an entry for messages of `gen` from `first_seq` on; returns its index.
    pub fn open(&mut self, gen: &GenId, epoch: u64, first_seq: u64) -> u32 {
        self.gens.push(BatchGen {
            gen: gen.clone(),
            epoch,
            first_seq,
            count: 0,
            done: false,
            head: NONE,
            tail: NONE,
        });
        (self.gens.len() - 1) as u32
    }

    /// The seq entry `g` takes next, unless it ended with a `done`.
    pub fn next_seq(&self, g: u32) -> Option<u64> {
        let e = self.gens.get(g as usize)?;
        (!e.done).then(|| e.first_seq + u64::from(e.count))
    }

    /// Adds the next message of entry `g` (its text is `head` then `body`) and the tokens it
    /// covers.
    pub fn push(&mut self, g: u32, head: &[u8], body: &[u8], tokens: &[u32], done: bool) {
        let idx = self.msgs.len() as u32;
        let Some(e) = self.gens.get_mut(g as usize) else {
            return;
        };
        let len = head.len() + body.len();
        self.msgs.push(MsgRef {
            off: self.data.len() as u32,
            len: len as u32,
            tok_off: self.tokens.len() as u32,
            tok_len: tokens.len() as u32,
            next: NONE,
        });
        // Most messages are a tag byte, a few bytes of text and one token: a call to memcpy
        // per part costs more than the copy.
        match head {
            [] => {}
            [b] => self.data.push(*b),
            _ => self.data.extend_from_slice(head),
        }
        if body.len() <= 16 {
            self.data.extend(body.iter().copied());
        } else {
            self.data.extend_from_slice(body);
        }
        match tokens {
            [t] => self.tokens.push(*t),
            _ => self.tokens.extend_from_slice(tokens),
        }
        if e.tail == NONE {
            e.head = idx;
        } else if let Some(prev) = self.msgs.get_mut(e.tail as usize) {
            prev.next = idx;
        }
        e.tail = idx;
        e.count += 1;
        e.done = done;
    }

    /// Text bytes so far (a shard starts a new batch well before `u32` offsets overflow).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gens.is_empty()
    }

    /// The batch so far; the builder starts over in `spare`'s buffers (a batch the store is
    /// done with), else in new ones with room for a batch as large.
    pub fn take(&mut self, spare: Option<Spare>) -> Batch {
        fn swap<T>(v: &mut Vec<T>, spare: Option<Vec<T>>) -> Vec<T> {
            let room = v.len() + v.len() / 4;
            let next = spare.unwrap_or_else(|| Vec::with_capacity(room));
            std::mem::replace(v, next)
        }
        let (gens, msgs, data, tokens) = match spare {
            Some(s) => (Some(s.gens), Some(s.msgs), s.data, Some(s.tokens)),
            None => (None, None, None, None),
        };
        Batch {
            gens: swap(&mut self.gens, gens),
            msgs: swap(&mut self.msgs, msgs),
            data: Bytes::from(swap(&mut self.data, data)),
            tokens: swap(&mut self.tokens, tokens),
        }
    }
}

/// A written batch's buffers, emptied, for its shard to fill again: big buffers freed on the
/// state thread and allocated anew on the shard each dispatch would cost fresh pages.
#[derive(Default)]
pub struct Spare {
    gens: Vec<BatchGen>,
    msgs: Vec<MsgRef>,
    /// The texts' buffer, unless the store kept it (the embedded store does).
    data: Option<Vec<u8>>,
    tokens: Vec<u32>,
}

impl Batch {
    /// Empties the batch into buffers to reuse.
    pub fn into_spare(self) -> Spare {
        let Batch {
            mut gens,
            mut msgs,
            data,
            mut tokens,
        } = self;
        gens.clear();
        msgs.clear();
        tokens.clear();
        let data = data.try_into_mut().ok().map(|b| {
            let mut v = Vec::from(b);
            v.clear();
            v
        });
        Spare {
            gens,
            msgs,
            data,
            tokens,
        }
    }
}

/// What became of one [`BatchGen`] entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    Ok,
    /// Every message was already logged (a retry): nothing changed.
    Duplicate,
    /// The epoch is not the generation's current one: another instance owns it now.
    Fenced,
    /// No such generation (expired or evicted).
    Gone,
    /// `first_seq` is past the log's end: an earlier append was lost; the log is closed.
    Gap,
}

/// An owner's lease on one generation.
#[derive(Clone, Debug)]
pub struct Lease {
    pub gen: GenId,
    pub epoch: u64,
}

/// The answer to a lease renewal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Renewed {
    /// The lease is another instance's now (or the generation is gone): stop generating.
    pub fenced: bool,
    /// A client asked (on some instance) to cancel it.
    pub cancel: bool,
    /// A resumed client read the log within the last lease period.
    pub watched: bool,
}

/// A generation as a resuming client finds it.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// Messages after the requested seq, in order (at most the requested number).
    pub msgs: Vec<(u64, Bytes)>,
    /// The highest logged seq.
    pub last_seq: u64,
    /// Messages up to this seq were trimmed by `ack`.
    pub trimmed: u64,
    pub done: bool,
    /// Messages were lost on the way to the store (queue overflow, a gap): not resumable.
    pub broken: bool,
    pub epoch: u64,
    /// The owner's lease has run out (or was released) and nothing finished it.
    pub lease_expired: bool,
}

/// The answer to a resume lookup.
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    /// The session's token hash, when the session is known.
    pub session: Option<[u8; 32]>,
    pub gen: Option<Found>,
}

/// A generation that this instance now owns.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub epoch: u64,
    pub request: Bytes,
    /// Generated tokens covered by the logged messages.
    pub tokens: Vec<u32>,
    pub last_seq: u64,
    /// The log to append to in place (embedded store).
    pub log: Option<local::LocalLog>,
}

#[derive(Clone, Debug)]
pub enum Claim {
    Claimed(Claimed),
    /// Its lease is live (or the epoch moved on): someone else owns it.
    Busy,
    /// Finished, broken or gone: nothing to carry on.
    Over,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store protocol error: {0}")]
    Protocol(String),
}

/// One tenant's usage on this instance, published for the others (limits across instances).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantReport {
    pub tenant: String,
    pub streams: u32,
    pub conns: u32,
    /// Requests admitted since this process started.
    pub requests: u64,
    /// Tokens charged since this process started, net of refunds.
    pub tokens: u64,
}

/// Another instance's last published usage of one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteUsage {
    pub instance: String,
    pub streams: u32,
    pub conns: u32,
    pub requests: u64,
    pub tokens: u64,
}

/// Lifetimes the store applies.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// How long a log outlives its last write.
    pub log: Duration,
    /// Lease length.
    pub lease: Duration,
}

/// The store behind the state thread. Calls are synchronous: only the state thread makes them.
pub trait StateStore: Send {
    /// Creates `starts` (epoch 1, leased to their owner), then applies the batches' entries in
    /// order: one answer per entry, batch after batch.
    fn write(&mut self, starts: &[Start], batches: &[Batch]) -> Result<Vec<Appended>, StoreError>;
    /// Extends the leases (one answer per lease).
    fn renew(&mut self, leases: &[Lease]) -> Result<Vec<Renewed>, StoreError>;
    /// Ends the leases now (graceful hand-over): another instance may claim at once.
    fn release(&mut self, leases: &[Lease]) -> Result<(), StoreError>;
    /// What a client resuming `id` of `session` after `after` gets; marks it watched.
    fn lookup(
        &mut self,
        session: &str,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Lookup, StoreError>;
    /// Takes over a generation whose lease expired, if its epoch is still `epoch`.
    fn claim(&mut self, gen: &str, epoch: u64, owner: &str) -> Result<Claim, StoreError>;
    /// Asks the owner (through its next renewal) to cancel.
    fn cancel(&mut self, gen: &str) -> Result<(), StoreError>;
    /// The request blob of a generation ([`Start::request`]); `None` when it is gone.
    fn request(&mut self, gen: &str) -> Result<Option<Bytes>, StoreError>;
    /// Removes a generation's log and metadata (its owner's next append finds it gone).
    fn delete(&mut self, gen: &str) -> Result<(), StoreError>;
    /// Drops messages up to `upto` (the client acknowledged them).
    fn trim(&mut self, gen: &str, upto: u64) -> Result<(), StoreError>;
    /// Marks a generation not resumable (its messages did not all reach the store).
    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError>;
    /// Checks the connection; reconnects when it was lost.
    fn ping(&mut self) -> Result<(), StoreError>;
    /// "memory", "redis" or "redis-cluster".
    fn kind(&self) -> &'static str;
    /// Failed calls retried so far (a cluster riding out a failover).
    fn retries(&self) -> u64 {
        0
    }
    /// Publishes `instance`'s usage of each tenant and returns, per report, what the other
    /// instances last published (within `stale`; older entries are dropped). A store that only
    /// this instance uses has no others.
    fn tenant_sync(
        &mut self,
        instance: &str,
        reports: &[TenantReport],
        stale: Duration,
    ) -> Result<Vec<Vec<RemoteUsage>>, StoreError> {
        let _ = (instance, stale);
        Ok(vec![Vec::new(); reports.len()])
    }
    /// The embedded store: shards write the logs in place ([`Start::log`]), made with these
    /// counters (bytes held, which the store's cap reads; messages appended).
    fn local(&self) -> Option<Arc<local::LogCounters>> {
        None
    }
}
