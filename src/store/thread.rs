//! The state thread: owns the [`StateStore`], fed by one bounded SPSC queue per shard that the
//! shard pushes into without waiting, answering each shard through its own reply box and
//! wake-up.
//!
//! Per turn it takes everything queued, makes one store call per kind of operation (one
//! pipeline for Redis, where the messages of one generation in the turn become one entry),
//! then serves the
//! resumed clients ("followers"): messages this instance just wrote are pushed to them at
//! once; generations owned elsewhere are polled every [`POLL`]. A follower whose generation's
//! lease ran out gets the generation claimed for it (the takeover), and its shard adopts it.
//!
//! A failing store never blocks a stream: the thread marks itself unhealthy (`/ready` shows
//! it), fails writes at once (their generations become not resumable) and pings with
//! exponential backoff until the store answers again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Appended, Batch, Claim, Claimed, GenId, Lease, Renewed, Spare, Start, StateStore};
use crate::engine::queue::{EngineParker, ShardWake};
use crate::engine::SeqKey;
use crate::metrics::Histogram;

/// How often a follower of a generation owned elsewhere reads the store.
pub const POLL: Duration = Duration::from_millis(20);
/// Messages fetched per lookup (a longer replay is paged).
const PAGE: usize = 1024;
/// Operations taken from the queues per turn.
const TURN: usize = 8192;
/// A busy state thread's pause between turns: batches gather meanwhile (one pipeline each).
const TURN_PAUSE: Duration = Duration::from_millis(1);
/// How far a client may be ahead of the log: it may have received messages whose write was
/// still in flight (one dispatch batch, one store round trip) when it lost its connection.
const AHEAD_MAX: u64 = 256;
/// How long a follower ahead of the log waits for a live owner's writes to catch up.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How often a follower ahead of the log reads it meanwhile: the embedded store's owners
/// publish once a tick (10 ms), Redis writes are a pipeline away.
const CATCH_UP_POLL: Duration = Duration::from_millis(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Shard → state thread.
pub enum StoreOp {
    /// New generations and a dispatch's messages (with the key of the request that wrote
    /// each of the batch's entries).
    Write {
        shard: u16,
        starts: Vec<Start>,
        batch: Batch,
        keys: Vec<SeqKey>,
        /// The messages are in the store already (the embedded store's shards append in
        /// place): they only go on to this instance's followers.
        logged: bool,
    },
    Renew(Vec<(Lease, SeqKey)>),
    /// Graceful hand-over (SIGTERM): the leases end now.
    Release(Vec<Lease>),
    /// A client resumes a generation after `after`.
    Follow {
        who: Who,
        after: u64,
        /// The first answer carries the generation's request blob (an HTTP view renders
        /// from it).
        with_request: bool,
        /// Set by the shard while the follower's connection is backlogged: the follow is then
        /// sent nothing (no pushes, no reads) and reads on from the log once it clears.
        backlogged: Arc<AtomicBool>,
    },
    /// One read of a whole log as it is now (`GET /v1/responses/{id}`); a generation whose
    /// owner is gone is claimed for this shard first, as a follow would.
    Read(Who),
    /// Removes a generation (cancelling it first) for the holder of its token.
    Delete(Who),
    Unfollow(u64),
    Cancel(GenId),
    Trim(GenId, u64),
    Broken(GenId),
}

/// Why a resume was refused: the `error` code and its message.
pub type Refusal = (&'static str, String);

/// The refusal while the store does not answer.
fn unavailable() -> Refusal {
    (
        "store_unavailable",
        "the state store is unreachable; retry".into(),
    )
}

/// State thread → shard.
pub enum StoreReply {
    /// The resume was refused (the follow is not registered).
    Refused { ticket: u64, why: Refusal },
    /// Messages `first_seq..` for a follower, contiguous with what it had; `done` ends it.
    Msgs {
        ticket: u64,
        first_seq: u64,
        msgs: Vec<Bytes>,
        done: bool,
        /// The request blob, in the first answer of a follow that asked for it.
        request: Option<Bytes>,
    },
    /// The answer to a [`StoreOp::Read`].
    Snapshot {
        ticket: u64,
        result: Result<Snapshot, Refusal>,
    },
    /// The answer to a [`StoreOp::Delete`].
    Deleted {
        ticket: u64,
        result: Result<(), Refusal>,
    },
    /// The follow ended without a `done` (the log broke or expired).
    Lost { ticket: u64, why: Refusal },
    /// This instance now owns the followed generation: carry it on.
    Adopt {
        ticket: u64,
        gen: GenId,
        claimed: Claimed,
    },
    /// An owner's append or renewal: stop (fenced), cancel, or keep alive (watched).
    Owner { key: SeqKey, what: OwnerNote },
    /// A [`Start`] that asked for it (`ack`) is in the store (`ok`), or could not be written.
    Started { key: SeqKey, ok: bool },
}

/// A whole log as one read found it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub request: Bytes,
    /// Every message from seq 1 on, in order.
    pub msgs: Vec<Bytes>,
    pub done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerNote {
    /// Another instance owns the generation now: stop without a word.
    Fenced,
    /// Its messages did not all reach the store: not resumable any more.
    Unsafe,
    Cancel,
    Watched,
}

/// One shard's reply box.
#[derive(Default)]
pub struct ReplyBox {
    q: Mutex<Vec<StoreReply>>,
    /// Buffers of written batches, for the shard's next ones.
    spares: Mutex<Vec<Spare>>,
    pub wake: ShardWake,
}

/// Spare batch buffers kept per shard.
const SPARES: usize = 16;

impl ReplyBox {
    /// A written batch's buffers, if any came back.
    pub fn spare(&self) -> Option<Spare> {
        self.spares.lock().ok()?.pop()
    }

    /// Keeps a written batch's buffers for the shard (up to [`SPARES`]).
    fn recycle(&self, b: Batch) {
        if let Ok(mut spares) = self.spares.lock() {
            if spares.len() < SPARES {
                spares.push(b.into_spare());
            }
        }
    }

    /// A reply the shard leaves for itself (an append it made in place was refused).
    pub fn post(&self, r: StoreReply) {
        if let Ok(mut q) = self.q.lock() {
            q.push(r);
        }
        self.wake.notify();
    }

    /// Takes everything the state thread left for this shard.
    pub fn take(&self, into: &mut Vec<StoreReply>) {
        if let Ok(mut q) = self.q.lock() {
            std::mem::swap(&mut *q, into);
        }
    }
}

/// The state thread's own metrics (written by it alone).
#[derive(Default)]
pub struct StoreMetrics {
    pub rtt: Histogram,
    pub queue_depth: AtomicU64,
    pub errors: AtomicU64,
    /// Failed store calls that were retried (a Redis Cluster failover, a reconnect).
    pub retries: AtomicU64,
    pub appends: AtomicU64,
    pub followers: AtomicU64,
}

/// What shards hold: their queue ends and reply boxes.
pub struct StoreHandle {
    /// One bounded lock-free queue per shard (the mutex is only ever taken by its own shard).
    queues: Vec<Mutex<rtrb::Producer<StoreOp>>>,
    parker: Arc<EngineParker>,
    stop: AtomicBool,
    pub boxes: Vec<Arc<ReplyBox>>,
    pub healthy: Arc<AtomicBool>,
    pub metrics: Arc<StoreMetrics>,
    pub kind: &'static str,
    /// Other instances see this store (Redis): hand generations over on SIGTERM.
    pub shared: bool,
    pub instance: Arc<str>,
    /// The embedded store: shards write the logs in place, made with these counters.
    pub local: Option<Arc<super::local::LogCounters>>,
    /// The tenants whose usage this instance shares with the others through the store, and
    /// how often (set once at start-up when tenants and a shared store are configured).
    pub tenant_sync: std::sync::OnceLock<(Arc<crate::ws::tenant::TenantTable>, Duration)>,
}

impl StoreHandle {
    /// Queues an operation from `shard`; false when its queue is full (the caller counts the
    /// drop). Wakes the state thread only when it sleeps for lack of work: a busy state thread
    /// takes a turn every [`TURN_PAUSE`] and costs the shards no system call.
    pub fn send(&self, shard: u16, op: StoreOp) -> bool {
        self.try_send(shard, op).is_ok()
    }

    /// [`Self::send`] that hands a refused operation back (by value, as it went in: boxing it
    /// would cost an allocation per dispatch for the rare refusal).
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, shard: u16, op: StoreOp) -> Result<(), StoreOp> {
        let Some(q) = self.queues.get(shard as usize) else {
            return Err(op);
        };
        let Ok(mut q) = q.lock() else {
            return Err(op);
        };
        match q.push(op) {
            Ok(()) => {
                drop(q);
                self.parker.unpark();
                Ok(())
            }
            Err(rtrb::PushError::Full(op)) => Err(op),
        }
    }

    /// Operations waiting for the state thread (at its last turn).
    pub fn depth(&self) -> u64 {
        self.metrics.queue_depth.load(Ordering::Relaxed)
    }

    /// Asks the state thread to take what is queued, write it, and exit.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.parker.end_sleep();
        if let Some(t) = self.parker.thread() {
            t.unpark();
        }
    }
}

/// Builds the queues (`capacity` operations per shard) and starts the thread.
pub fn spawn(
    store: Box<dyn StateStore>,
    shards: usize,
    capacity: usize,
    instance: Arc<str>,
) -> std::io::Result<(Arc<StoreHandle>, std::thread::JoinHandle<()>)> {
    let mut queues = Vec::with_capacity(shards);
    let mut inboxes = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (tx, rx) = rtrb::RingBuffer::new(capacity.max(16));
        queues.push(Mutex::new(tx));
        inboxes.push(rx);
    }
    let boxes: Vec<Arc<ReplyBox>> = (0..shards).map(|_| Arc::default()).collect();
    let parker = Arc::new(EngineParker::default());
    let handle = Arc::new(StoreHandle {
        queues,
        parker: parker.clone(),
        stop: AtomicBool::new(false),
        boxes: boxes.clone(),
        healthy: Arc::new(AtomicBool::new(true)),
        metrics: Arc::default(),
        kind: store.kind(),
        shared: store.kind() != "memory",
        instance: instance.clone(),
        local: store.local(),
        tenant_sync: std::sync::OnceLock::new(),
    });
    let h = handle.clone();
    let span = tracing::Span::current();
    let join = std::thread::Builder::new()
        .name("state".into())
        .spawn(move || {
            let _in = span.entered();
            parker.register_current();
            let mut t = StateThread {
                store,
                boxes,
                handle: h,
                instance,
                follows: HashMap::new(),
                by_gen: HashMap::new(),
                out: Vec::new(),
                healthy: true,
                retry_at: Instant::now(),
                backoff: BACKOFF_MIN,
                next_sync: Instant::now(),
                seen: HashMap::new(),
                synced: Instant::now(),
            };
            t.run(inboxes, &parker);
        })?;
    Ok((handle, join))
}

/// Who asks, for which generation: `id` of `session`, for connection ticket `ticket` of
/// `shard`, proving it with the hash of the generation's token.
pub struct Who {
    pub shard: u16,
    pub ticket: u64,
    pub session: Arc<str>,
    pub id: Arc<str>,
    pub token_hash: [u8; 32],
}

struct Follow {
    shard: u16,
    session: Arc<str>,
    id: Arc<str>,
    gen: GenId,
    last_seq: u64,
    epoch: u64,
    next_poll: Instant,
    /// Set while the client is ahead of the log: the deadline for a live owner to catch up.
    catch_up: Option<Instant>,
    /// The owner pushed it a message (the embedded store's owner does from its first publish
    /// after the follow began, up to a tick later; until then the follower reads the log).
    pushed: bool,
    /// Its connection is backlogged (set by the shard): no pushes, no reads.
    backlogged: Arc<AtomicBool>,
}

impl Follow {
    fn paused(&self) -> bool {
        self.backlogged.load(Ordering::Relaxed)
    }

    /// How soon to read the log again: soon while ahead of it, or while an embedded store's
    /// owner has not begun pushing.
    fn poll_every(&self, local: bool) -> Duration {
        if self.catch_up.is_some() || (local && !self.pushed) {
            CATCH_UP_POLL
        } else {
            POLL
        }
    }
}

struct StateThread {
    store: Box<dyn StateStore>,
    boxes: Vec<Arc<ReplyBox>>,
    handle: Arc<StoreHandle>,
    instance: Arc<str>,
    follows: HashMap<u64, Follow>,
    by_gen: HashMap<GenId, Vec<u64>>,
    /// Replies per shard, handed over at the end of the turn.
    out: Vec<(u16, StoreReply)>,
    healthy: bool,
    retry_at: Instant,
    backoff: Duration,
    /// When the tenants' usage is published next.
    next_sync: Instant,
    /// Per (tenant, other instance): the cumulative requests and tokens it published last (so
    /// that only what it used since is applied) and the tokens charged here for it (what its
    /// refunds may give back).
    seen: HashMap<(String, String), (u64, u64, i64)>,
    /// The last successful tenant sync.
    synced: Instant,
}

fn shard_of(ticket: u64) -> u16 {
    (ticket >> 48) as u16
}

impl StateThread {
    fn run(&mut self, mut inboxes: Vec<rtrb::Consumer<StoreOp>>, parker: &EngineParker) {
        let mut ops = Vec::with_capacity(TURN);
        loop {
            let stop = self.handle.stop.load(Ordering::SeqCst);
            let waiting: usize = inboxes.iter().map(|q| q.slots()).sum();
            self.handle
                .metrics
                .queue_depth
                .store(waiting as u64, Ordering::Relaxed);
            for q in inboxes.iter_mut() {
                while ops.len() < TURN {
                    match q.pop() {
                        Ok(op) => ops.push(op),
                        Err(_) => break,
                    }
                }
            }
            let idle = ops.is_empty();
            self.check_health();
            self.turn(std::mem::take(&mut ops));
            self.sync_tenants();
            self.poll_remote();
            self.deliver();
            self.handle
                .metrics
                .followers
                .store(self.follows.len() as u64, Ordering::Relaxed);
            if stop && inboxes.iter().all(|q| q.is_empty()) {
                return;
            }
            if !idle {
                // Busy: let the next batch gather (no wake-ups asked of the shards meanwhile).
                std::thread::park_timeout(TURN_PAUSE);
                continue;
            }
            parker.begin_sleep();
            if inboxes.iter().all(|q| q.is_empty()) && !self.handle.stop.load(Ordering::SeqCst) {
                let wait = if self.follows.is_empty() {
                    Duration::from_millis(100)
                } else if self.follows.values().any(|f| {
                    !f.paused() && f.poll_every(self.handle.local.is_some()) == CATCH_UP_POLL
                }) {
                    CATCH_UP_POLL
                } else {
                    POLL
                };
                std::thread::park_timeout(wait);
            }
            parker.end_sleep();
        }
    }

    /// Every `tenant_sync_ms`: publishes this instance's usage of each tenant and applies the
    /// other instances' (what they admitted since their last report to the rate buckets, what
    /// they hold open to the concurrency caps).
    fn sync_tenants(&mut self) {
        let handle = self.handle.clone();
        let Some((table, every)) = handle.tenant_sync.get() else {
            return;
        };
        let now = Instant::now();
        if now < self.next_sync {
            return;
        }
        self.next_sync = now + *every;
        let tenants = table.current();
        // An instance that stopped publishing for this long is gone: its streams no longer count.
        let stale = (*every * 4).max(Duration::from_secs(1));
        if !self.healthy {
            // Without the store the others' last report ages: past `stale`, this instance
            // stops counting what they hold open (its own limits stay exact).
            if now.duration_since(self.synced) > stale {
                for t in tenants.iter() {
                    t.state.set_remote(0, 0);
                }
                self.seen.clear();
            }
            return;
        }
        let reports: Vec<super::TenantReport> = tenants
            .iter()
            .map(|t| super::TenantReport {
                tenant: t.id.clone(),
                streams: t.state.streams(),
                conns: t.state.connections(),
                requests: t.state.admitted.load(Ordering::Relaxed),
                tokens: t.state.tokens_charged.load(Ordering::Relaxed),
            })
            .collect();
        let instance = self.instance.clone();
        let others = match self.timed(|s| s.tenant_sync(&instance, &reports, stale)) {
            Ok(o) => o,
            Err(e) => {
                self.fail(&e);
                return;
            }
        };
        self.synced = now;
        let mut seen = HashMap::with_capacity(self.seen.len());
        for (t, others) in tenants.iter().zip(others) {
            let (mut streams, mut conns, mut requests, mut tokens) = (0u32, 0u32, 0i64, 0i64);
            for o in others {
                streams = streams.saturating_add(o.streams);
                conns = conns.saturating_add(o.conns);
                let key = (t.id.clone(), o.instance);
                // First sight of an instance: what it used before is not known (its totals are
                // the baseline, nothing of it charged here yet).
                let (r0, k0, charged) = self
                    .seen
                    .get(&key)
                    .copied()
                    .unwrap_or((o.requests, o.tokens, 0));
                // Requests only grow, so fewer than last time is a restarted instance (the same
                // id): all it published is new. Tokens shrink with refunds.
                let (dr, dk) = if o.requests < r0 {
                    (o.requests as i64, o.tokens as i64)
                } else {
                    ((o.requests - r0) as i64, o.tokens as i64 - k0 as i64)
                };
                // A refund gives back at most what was charged here for that instance (the
                // refund of a charge made before its first sight was never charged).
                let dk = dk.max(-charged);
                seen.insert(key, (o.requests, o.tokens, charged + dk));
                requests += dr;
                tokens += dk;
            }
            t.state.set_remote(streams, conns);
            t.state.apply_remote(requests, tokens);
        }
        // Instances gone stale (and tenants removed by a reload) are forgotten.
        self.seen = seen;
    }

    /// Hands the turn's replies to their shards, one wake-up each.
    fn deliver(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let mut touched = vec![false; self.boxes.len()];
        for (shard, r) in self.out.drain(..) {
            let Some(b) = self.boxes.get(shard as usize) else {
                continue;
            };
            if let Ok(mut q) = b.q.lock() {
                q.push(r);
            }
            touched[shard as usize] = true;
        }
        for (i, t) in touched.into_iter().enumerate() {
            if t {
                self.boxes[i].wake.notify();
            }
        }
    }

    fn fail(&mut self, e: &super::StoreError) {
        self.handle.metrics.errors.fetch_add(1, Ordering::Relaxed);
        if self.healthy {
            tracing::warn!("{e}; resumable streams are not persisted until it is back");
        }
        self.healthy = false;
        self.handle.healthy.store(false, Ordering::Release);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn check_health(&mut self) {
        if self.healthy || Instant::now() < self.retry_at {
            return;
        }
        match self.store.ping() {
            Ok(()) => {
                tracing::info!("state store ({}) is back", self.store.kind());
                self.healthy = true;
                self.backoff = BACKOFF_MIN;
                self.handle.healthy.store(true, Ordering::Release);
            }
            Err(e) => self.fail(&e),
        }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn StateStore) -> T) -> T {
        let t = Instant::now();
        let r = f(&mut *self.store);
        self.handle.metrics.rtt.observe(t.elapsed());
        let retries = self.store.retries();
        self.handle
            .metrics
            .retries
            .store(retries, Ordering::Relaxed);
        r
    }

    fn turn(&mut self, ops: Vec<StoreOp>) {
        let mut starts = Vec::new();
        let mut batches = Vec::new();
        let mut keys = Vec::new();
        let mut logged = Vec::new();
        let mut renews = Vec::new();
        let mut releases = Vec::new();
        let mut rest = Vec::new();
        for op in ops {
            match op {
                StoreOp::Write {
                    shard,
                    starts: s,
                    batch,
                    keys: k,
                    logged: l,
                } => {
                    starts.extend(s);
                    if batch.gens.is_empty() {
                    } else if l {
                        logged.push((shard, batch));
                    } else {
                        batches.push((shard, batch));
                        keys.extend(k);
                    }
                }
                StoreOp::Renew(l) => renews.extend(l),
                StoreOp::Release(l) => releases.extend(l),
                other => rest.push(other),
            }
        }
        self.write(starts, batches, keys);
        for (shard, b) in logged {
            for i in 0..b.gens.len() {
                self.push_to_followers(&b, i);
            }
            if let Some(r) = self.boxes.get(shard as usize) {
                r.recycle(b);
            }
        }
        self.renew(renews);
        if !releases.is_empty() && self.healthy {
            if let Err(e) = self.timed(|s| s.release(&releases)) {
                self.fail(&e);
            }
        }
        for op in rest {
            self.misc(op);
        }
    }

    fn write(&mut self, starts: Vec<Start>, batches: Vec<(u16, Batch)>, keys: Vec<SeqKey>) {
        if starts.is_empty() && batches.is_empty() {
            return;
        }
        let (shards, batches): (Vec<u16>, Vec<Batch>) = batches.into_iter().unzip();
        let result = if self.healthy {
            self.timed(|s| s.write(&starts, &batches))
        } else {
            Err(super::StoreError::Unavailable("reconnecting".into()))
        };
        for key in starts.iter().filter_map(|s| s.ack) {
            let ok = result.is_ok();
            self.out.push((key.shard, StoreReply::Started { key, ok }));
        }
        let results = match result {
            Ok(r) => r,
            Err(e) => {
                if self.healthy {
                    self.fail(&e);
                }
                vec![Appended::Gone; keys.len()]
            }
        };
        let entries = batches
            .iter()
            .flat_map(|b| (0..b.gens.len()).map(move |i| (b, i)));
        let mut logged = 0;
        let mut pushes = Vec::new();
        for (((b, i), key), r) in entries.zip(keys).zip(results) {
            match r {
                Appended::Ok => {
                    logged += u64::from(b.gens[i].count);
                    if self.by_gen.contains_key(&b.gens[i].gen) {
                        pushes.push((b, i));
                    }
                }
                Appended::Duplicate => {}
                Appended::Fenced => self.note(key, OwnerNote::Fenced),
                Appended::Gone | Appended::Gap => self.note(key, OwnerNote::Unsafe),
            }
        }
        for (b, i) in pushes {
            self.push_to_followers(b, i);
        }
        self.handle
            .metrics
            .appends
            .fetch_add(logged, Ordering::Relaxed);
        for (shard, b) in shards.into_iter().zip(batches) {
            if let Some(r) = self.boxes.get(shard as usize) {
                r.recycle(b);
            }
        }
    }

    fn note(&mut self, key: SeqKey, what: OwnerNote) {
        self.out.push((key.shard, StoreReply::Owner { key, what }));
    }

    fn renew(&mut self, renews: Vec<(Lease, SeqKey)>) {
        if renews.is_empty() || !self.healthy {
            return;
        }
        let leases: Vec<Lease> = renews.iter().map(|(l, _)| l.clone()).collect();
        match self.timed(|s| s.renew(&leases)) {
            Ok(rs) => {
                for ((l, key), r) in renews.into_iter().zip(rs) {
                    let Renewed {
                        fenced,
                        cancel,
                        watched,
                    } = r;
                    // A local follower keeps its generation alive too.
                    let local = self.by_gen.contains_key(&l.gen);
                    if fenced {
                        self.note(key, OwnerNote::Fenced);
                    } else if cancel {
                        self.note(key, OwnerNote::Cancel);
                    } else if watched || local {
                        self.note(key, OwnerNote::Watched);
                    }
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    fn misc(&mut self, op: StoreOp) {
        if !self.healthy {
            let why = unavailable;
            let reply = match op {
                StoreOp::Follow { who, .. } => Some((
                    who.shard,
                    StoreReply::Refused {
                        ticket: who.ticket,
                        why: why(),
                    },
                )),
                StoreOp::Read(who) => Some((
                    who.shard,
                    StoreReply::Snapshot {
                        ticket: who.ticket,
                        result: Err(why()),
                    },
                )),
                StoreOp::Delete(who) => Some((
                    who.shard,
                    StoreReply::Deleted {
                        ticket: who.ticket,
                        result: Err(why()),
                    },
                )),
                _ => None,
            };
            self.out.extend(reply);
            return;
        }
        let r = match op {
            StoreOp::Follow {
                who,
                after,
                with_request,
                backlogged,
            } => {
                self.follow(who, after, with_request, backlogged);
                Ok(())
            }
            StoreOp::Read(who) => {
                self.read(who);
                Ok(())
            }
            StoreOp::Delete(who) => {
                self.delete(who);
                Ok(())
            }
            StoreOp::Unfollow(ticket) => {
                self.unfollow(ticket);
                Ok(())
            }
            StoreOp::Cancel(gen) => self.timed(|s| s.cancel(&gen)),
            StoreOp::Trim(gen, upto) => self.timed(|s| s.trim(&gen, upto)),
            StoreOp::Broken(gen) => self.timed(|s| s.mark_broken(&gen)),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.fail(&e);
        }
    }

    /// Looks a generation up for `who` (messages after `after`); `Err`: the refusal to send.
    fn look(&mut self, who: &Who, after: u64) -> Result<super::Found, Refusal> {
        let (session, id) = (&who.session, &who.id);
        let found = match self.timed(|s| s.lookup(session, id, after, PAGE)) {
            Ok(l) => l,
            Err(e) => {
                self.fail(&e);
                return Err(unavailable());
            }
        };
        match (found.session, found.gen) {
            (None, _) => Err((
                "unknown_session",
                format!("session {session:?} is unknown or expired"),
            )),
            (Some(h), _) if !super::hashes_equal(&h, &who.token_hash) => Err((
                "bad_token",
                "the resume token does not match the session".into(),
            )),
            (_, None) => Err((
                "unknown_id",
                format!("no generation {id:?} in session {session:?} (unknown or expired)"),
            )),
            (_, Some(g)) => Ok(g),
        }
    }

    fn follow(&mut self, who: Who, after: u64, with_request: bool, backlogged: Arc<AtomicBool>) {
        let Who {
            shard,
            ticket,
            ref id,
            ..
        } = who;
        let refuse = |code: &'static str, msg: String| Some((code, msg));
        let found = self.look(&who, after);
        let why = match &found {
            Err(why) => Some(why.clone()),
            Ok(g) if g.broken => refuse(
                "not_resumable",
                format!("generation {id:?} lost messages on the way to the store"),
            ),
            Ok(g) if g.done && after >= g.last_seq => refuse(
                "already_finished",
                format!("generation {id:?} ended at seq {}", g.last_seq),
            ),
            Ok(g) if after > g.last_seq + AHEAD_MAX => refuse(
                "bad_offset",
                format!(
                    "after={after} is beyond the last seq {} of {id:?}",
                    g.last_seq
                ),
            ),
            Ok(g) if after < g.trimmed => refuse(
                "bad_offset",
                format!(
                    "seq up to {} of {id:?} was acknowledged and trimmed",
                    g.trimmed
                ),
            ),
            _ => None,
        };
        if let Some(why) = why {
            self.out.push((shard, StoreReply::Refused { ticket, why }));
            return;
        }
        let Ok(g) = found else { return };
        let Who { session, id, .. } = who;
        let request = if with_request {
            match self.timed(|s| s.request(&super::gen_id(&session, &id))) {
                Ok(Some(r)) => Some(r),
                Ok(None) => {
                    let why = ("unknown_id", format!("no generation {id:?} (expired)"));
                    self.out.push((shard, StoreReply::Refused { ticket, why }));
                    return;
                }
                Err(e) => {
                    self.fail(&e);
                    let why = unavailable();
                    self.out.push((shard, StoreReply::Refused { ticket, why }));
                    return;
                }
            }
        } else {
            None
        };
        let gen = super::gen_id(&session, &id);
        // Ahead of the log: wait for the owner's in-flight writes (or, if it is gone, for the
        // takeover to regenerate them; they are not sent again).
        let catch_up = (after > g.last_seq).then(|| Instant::now() + CATCH_UP);
        let mut f = Follow {
            shard,
            session,
            id,
            gen: gen.clone(),
            last_seq: after,
            epoch: g.epoch,
            next_poll: Instant::now(),
            catch_up,
            pushed: false,
            backlogged,
        };
        f.next_poll += f.poll_every(self.handle.local.is_some());
        let ended = self.send_found(ticket, &mut f, g, Some(request));
        if !ended {
            self.by_gen.entry(gen).or_default().push(ticket);
            self.follows.insert(ticket, f);
        }
    }

    /// Delivers a lookup's messages; claims the generation when its owner is gone. True when
    /// the follow is over.
    /// `first`: the follow's first answer (with the request blob, if it asked for it).
    fn send_found(
        &mut self,
        ticket: u64,
        f: &mut Follow,
        g: super::Found,
        first: Option<Option<Bytes>>,
    ) -> bool {
        let first_seq = f.last_seq + 1;
        let mut msgs = Vec::with_capacity(g.msgs.len());
        for (seq, m) in g.msgs {
            if seq == f.last_seq + 1 {
                f.last_seq = seq;
                msgs.push(m);
            }
        }
        f.epoch = g.epoch;
        if g.last_seq >= f.last_seq {
            f.catch_up = None;
        } else if let Some(t) = f.catch_up {
            if t <= Instant::now() && !g.lease_expired {
                let why = (
                    "bad_offset",
                    format!(
                        "after={} is beyond the last logged seq {}",
                        f.last_seq, g.last_seq
                    ),
                );
                self.out.push((f.shard, StoreReply::Lost { ticket, why }));
                return true;
            }
        }
        let done = g.done && f.last_seq >= g.last_seq;
        // Paged (or an entry still to come): read on at once.
        let more = !msgs.is_empty() && f.last_seq < g.last_seq;
        // The first answer goes out even when empty: it tells the shard the resume is accepted.
        if !msgs.is_empty() || done || first.is_some() {
            self.out.push((
                f.shard,
                StoreReply::Msgs {
                    ticket,
                    first_seq,
                    msgs,
                    done,
                    request: first.flatten(),
                },
            ));
        }
        if done {
            return true;
        }
        if more {
            f.next_poll = Instant::now();
            return false;
        }
        if g.broken {
            let why = (
                "not_resumable",
                "the generation lost messages on the way to the store".into(),
            );
            self.out.push((f.shard, StoreReply::Lost { ticket, why }));
            return true;
        }
        if g.lease_expired && f.last_seq >= g.last_seq {
            return self.take_over(ticket, f);
        }
        false
    }

    /// The owner's lease expired: claim the generation for the follower's shard.
    fn take_over(&mut self, ticket: u64, f: &mut Follow) -> bool {
        let instance = self.instance.clone();
        match self.timed(|s| s.claim(&f.gen, f.epoch, &instance)) {
            Ok(Claim::Claimed(claimed)) => {
                f.epoch = claimed.epoch;
                let gen = f.gen.clone();
                self.out.push((
                    f.shard,
                    StoreReply::Adopt {
                        ticket,
                        gen,
                        claimed,
                    },
                ));
                false
            }
            Ok(Claim::Busy) => false,
            Ok(Claim::Over) => {
                // Finished meanwhile (the next poll delivers the end) or gone.
                f.next_poll = Instant::now();
                false
            }
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    /// A whole log for `who`, paged; claims it first when its owner is gone.
    fn read(&mut self, who: Who) {
        let (shard, ticket) = (who.shard, who.ticket);
        let result = self.read_all(&who);
        self.out
            .push((shard, StoreReply::Snapshot { ticket, result }));
    }

    fn read_all(&mut self, who: &Who) -> Result<Snapshot, Refusal> {
        let gen = super::gen_id(&who.session, &who.id);
        let mut snap = Snapshot::default();
        let mut g = self.look(who, 0)?;
        if g.trimmed > 0 || g.broken {
            return Err((
                "not_resumable",
                format!("generation {:?} is not whole in the store", who.id),
            ));
        }
        loop {
            let mut got = false;
            for (seq, m) in std::mem::take(&mut g.msgs) {
                if seq == snap.msgs.len() as u64 + 1 {
                    snap.msgs.push(m);
                    got = true;
                }
            }
            snap.done = g.done && snap.msgs.len() as u64 >= g.last_seq;
            if !got || snap.msgs.len() as u64 >= g.last_seq {
                break;
            }
            g = self.look(who, snap.msgs.len() as u64)?;
        }
        snap.request = match self.timed(|s| s.request(&gen)) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(("unknown_id", format!("no generation {:?}", who.id))),
            Err(e) => {
                self.fail(&e);
                return Err(unavailable());
            }
        };
        if g.lease_expired && !snap.done {
            // Nobody carries it on: this instance does (a background response must finish
            // whether or not a client streams it).
            let instance = self.instance.clone();
            match self.timed(|s| s.claim(&gen, g.epoch, &instance)) {
                Ok(Claim::Claimed(claimed)) => self.out.push((
                    who.shard,
                    StoreReply::Adopt {
                        ticket: who.ticket,
                        gen,
                        claimed,
                    },
                )),
                Ok(_) => {}
                Err(e) => self.fail(&e),
            }
        }
        Ok(snap)
    }

    /// Cancels and removes a generation for the holder of its token.
    fn delete(&mut self, who: Who) {
        let gen = super::gen_id(&who.session, &who.id);
        let result = self.look(&who, u64::MAX - 1).and_then(|_| {
            let r = self
                .timed(|s| s.cancel(&gen))
                .and_then(|()| self.timed(|s| s.delete(&gen)));
            r.map_err(|e| {
                self.fail(&e);
                unavailable()
            })
        });
        let (shard, ticket) = (who.shard, who.ticket);
        self.out
            .push((shard, StoreReply::Deleted { ticket, result }));
    }

    fn unfollow(&mut self, ticket: u64) {
        if let Some(f) = self.follows.remove(&ticket) {
            if let Some(v) = self.by_gen.get_mut(&f.gen) {
                v.retain(|t| *t != ticket);
                if v.is_empty() {
                    self.by_gen.remove(&f.gen);
                }
            }
        }
    }

    /// Pushes entry `i` of a just-written batch to this instance's followers of its generation.
    fn push_to_followers(&mut self, b: &Batch, i: usize) {
        let a = &b.gens[i];
        let Some(tickets) = self.by_gen.get(&a.gen).cloned() else {
            return;
        };
        for ticket in tickets {
            let Some(f) = self.follows.get_mut(&ticket) else {
                continue;
            };
            if f.paused() {
                continue;
            }
            if a.first_seq > f.last_seq + 1 {
                // Behind (a paged replay): the poll catches up from the store.
                f.next_poll = Instant::now();
                continue;
            }
            let skip = (f.last_seq + 1 - a.first_seq) as usize;
            let msgs: Vec<Bytes> = b.texts(i).skip(skip).collect();
            if msgs.is_empty() {
                continue;
            }
            let first_seq = f.last_seq + 1;
            f.last_seq = a.last_seq();
            f.epoch = a.epoch;
            // The log has passed the client's offset.
            f.catch_up = None;
            f.pushed = true;
            f.next_poll = Instant::now() + POLL * 5;
            let shard = f.shard;
            self.out.push((
                shard,
                StoreReply::Msgs {
                    ticket,
                    first_seq,
                    msgs,
                    done: a.done,
                    request: None,
                },
            ));
            if a.done {
                self.unfollow(ticket);
            }
        }
    }

    /// Reads the store for followers whose generation is written elsewhere (or whose replay
    /// is paged), and takes over the ones whose owner is gone.
    fn poll_remote(&mut self) {
        if !self.healthy || self.follows.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        for (t, f) in self.follows.iter_mut() {
            if f.paused() {
                // The time its client spends not reading does not count against catching up.
                if let Some(c) = f.catch_up.as_mut() {
                    *c = (*c).max(now + CATCH_UP);
                }
            } else if f.next_poll <= now {
                due.push(*t);
            }
        }
        for ticket in due {
            let Some(mut f) = self.follows.remove(&ticket) else {
                continue;
            };
            f.next_poll = now + f.poll_every(self.handle.local.is_some());
            let (session, id, after) = (f.session.clone(), f.id.clone(), f.last_seq);
            match self.timed(|s| s.lookup(&session, &id, after, PAGE)) {
                Ok(super::Lookup { gen: Some(g), .. }) => {
                    if self.send_found(ticket, &mut f, g, None) {
                        self.follows.insert(ticket, f);
                        self.unfollow(ticket);
                    } else {
                        self.follows.insert(ticket, f);
                    }
                }
                Ok(_) => {
                    let why = ("unknown_id", "the generation expired from the store".into());
                    self.out
                        .push((shard_of(ticket), StoreReply::Lost { ticket, why }));
                    self.follows.insert(ticket, f);
                    self.unfollow(ticket);
                }
                Err(e) => {
                    self.follows.insert(ticket, f);
                    self.fail(&e);
                    return;
                }
            }
        }
    }
}
