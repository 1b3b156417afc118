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
//! ([`thread`]); shards talk to it through bounded queues and never wait for it.

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
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
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
}

/// Messages `first_seq..` of one generation, and the generated tokens they cover.
#[derive(Clone, Debug)]
pub struct Append {
    pub gen: GenId,
    pub epoch: u64,
    pub first_seq: u64,
    /// JSON text of each message, in seq order.
    pub msgs: Vec<Bytes>,
    pub tokens: Vec<u32>,
    /// The last message is the `done`.
    pub done: bool,
}

impl Append {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.msgs.len() as u64 - 1
    }
}

/// What became of one [`Append`].
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
    /// Creates `starts` (epoch 1, leased to their owner), then applies `appends` in order.
    fn write(&mut self, starts: &[Start], appends: &[Append]) -> Result<Vec<Appended>, StoreError>;
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
    /// Drops messages up to `upto` (the client acknowledged them).
    fn trim(&mut self, gen: &str, upto: u64) -> Result<(), StoreError>;
    /// Marks a generation not resumable (its messages did not all reach the store).
    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError>;
    /// Checks the connection; reconnects when it was lost.
    fn ping(&mut self) -> Result<(), StoreError>;
    /// "memory" or "redis".
    fn kind(&self) -> &'static str;
}
