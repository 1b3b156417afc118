//! One network shard: a monoio runtime pinned to one core with its own `SO_REUSEPORT` listener.
//!
//! Everything a shard owns — connections, in-flight requests, its queue ends to the engine — is
//! behind `Rc`/`RefCell`/`Cell`: a connection never leaves the shard that accepted it, so nothing
//! here needs a lock. Three tasks run besides the connections: the accept loop, the dispatcher
//! (drains the engine's token events, one wake-up per engine batch) and the tick (timeouts,
//! heartbeats, chunk latency caps, shutdown).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::io::Canceller;
use monoio::net::{ListenerOpts, TcpListener};
use slab::Slab;

use crate::config::Config;
use crate::engine::queue::ShardLink;
use crate::engine::{EngineMsg, SeqKey};
use crate::metrics::{Registry, ShardMetrics};
use crate::server::conn::{self, Conn};
use crate::session::codec::Codec;
use crate::session::request::ReqEntry;

/// Interval of the shard's timer tick.
pub const TICK: Duration = Duration::from_millis(10);

/// Process-wide facts every shard reads (immutable after start, or atomics).
pub struct Shared {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub models: Vec<String>,
    pub codec: Codec,
    /// Prompt plus generated tokens a sequence may hold (`None`: no limit, the null model).
    pub max_model_len: Option<usize>,
    pub ready: AtomicBool,
    pub shutdown: AtomicBool,
    /// The tenants in force (replaced whole on SIGHUP).
    pub tenants: Arc<crate::ws::tenant::TenantTable>,
    /// The state thread's queue (`None`: resume is off).
    pub store: Option<Arc<crate::store::thread::StoreHandle>>,
    /// zstd context memory of all shards.
    pub compression: Arc<crate::session::compress::Budget>,
    /// TLS (certificate, tickets), when a TLS listener is configured.
    pub tls: Option<Arc<crate::server::tls::Tls>>,
    /// Per-address connection limits, when configured.
    pub ip_limits: Option<Arc<crate::session::limits::IpLimits>>,
}

/// A shard's state, owned by its thread.
pub struct Shard {
    pub id: u16,
    pub shared: Arc<Shared>,
    pub metrics: Arc<ShardMetrics>,
    pub link: RefCell<ShardLink>,
    pub conns: RefCell<Slab<Rc<Conn>>>,
    /// In-flight generations, indexed by `SeqKey::slot`.
    pub requests: RefCell<Slab<ReqEntry>>,
    /// Generation of each request slot, bumped on reuse.
    pub slot_gens: RefCell<Vec<u32>>,
    /// Connections with output queued during the current dispatch, woken once at its end.
    pub dirty: RefCell<Vec<Rc<Conn>>>,
    /// Control messages that found the engine queue full, retried on every tick.
    pub backlog: RefCell<Vec<EngineMsg>>,
    pub epoch: Instant,
    pub accept_cancel: RefCell<Canceller>,
    pub draining: Cell<bool>,
    /// When this shard first saw the shutdown flag (it drains `drain_delay` later).
    pub shutdown_seen: Cell<Option<Instant>>,
    /// Store traffic waiting for the end of the dispatch, and resumed clients.
    pub journal: crate::session::journal::ShardJournal,
    /// Connections with messages held for credit (keys), for the throttle tick.
    pub throttled: RefCell<Vec<usize>>,
    /// zstd level for this shard's load (`None`: breaker open, send plain).
    pub zstd_level: Cell<Option<i32>>,
    /// Free compression contexts, reused by connections that start streaming again.
    pub pools: crate::session::compress::Pools,
    /// Wall clock and this thread's CPU time at the last load sample.
    pub cpu_sample: Cell<(Instant, Duration)>,
}

impl Shard {
    /// Microseconds since the shard started (heartbeat timestamps).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Sends a control message to the engine; a full queue defers it to the next tick.
    pub fn send_control(&self, msg: EngineMsg) {
        let mut link = self.link.borrow_mut();
        if let Err(m) = link.send(msg) {
            self.backlog.borrow_mut().push(m);
        }
    }

    /// Allocates a request slot; the key names it on the engine side.
    pub fn insert_request(&self, entry: ReqEntry) -> SeqKey {
        let mut reqs = self.requests.borrow_mut();
        let slot = reqs.insert(entry);
        let mut gens = self.slot_gens.borrow_mut();
        if gens.len() <= slot {
            gens.resize(slot + 1, 0);
        }
        gens[slot] = gens[slot].wrapping_add(1);
        let key = SeqKey {
            shard: self.id,
            slot: slot as u32,
            gen: gens[slot],
        };
        if let Some(e) = reqs.get_mut(slot) {
            e.key = key;
        }
        key
    }

    /// Queues a connection for a writer wake-up at the end of the current dispatch.
    pub fn mark_dirty(&self, conn: &Rc<Conn>) {
        if !conn.dirty.replace(true) {
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    /// Wakes the writers of every connection that got output, once each.
    pub fn flush_dirty(&self) {
        crate::session::journal::flush(self);
        let mut dirty = self.dirty.borrow_mut();
        for c in dirty.drain(..) {
            c.dirty.set(false);
            crate::session::flow::pump(self, &c, false);
            c.wake_writer.notify();
            conn::apply_backpressure(self, &c);
        }
    }
}

/// Binds this shard's listener (SO_REUSEPORT, so every shard has its own accept queue).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    TcpListener::bind_with_config(addr, &opts)
}

/// The shard's main task: the plain listener's accept loop (and the TLS one's, when present).
pub async fn run(shard: Rc<Shard>, listener: TcpListener, tls_listener: Option<TcpListener>) {
    monoio::spawn(dispatch(shard.clone()));
    monoio::spawn(tick(shard.clone()));
    monoio::spawn(crate::session::resume::replies(shard.clone()));
    let tls_loop = match (tls_listener, shard.shared.tls.as_ref()) {
        (Some(l), Some(tls)) => Some(monoio::spawn(accept_loop(
            shard.clone(),
            l,
            Some(tls.config.clone()),
        ))),
        _ => None,
    };
    accept_loop(shard.clone(), listener, None).await;
    if let Some(t) = tls_loop {
        t.await;
    }
    drain(&shard).await;
}

/// Accepts until the shard drains; `tls`: connections on this listener speak TLS.
async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let max = shard.shared.config.server.max_connections_per_core;
    loop {
        let accepted = {
            let handle = shard.accept_cancel.borrow().handle();
            listener.cancelable_accept(handle).await
        };
        if shard.draining.get() {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(shard = shard.id, "accept: {e}");
                // EMFILE and friends: back off instead of spinning.
                monoio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        shard.metrics.accepted_connections.inc();
        let slot = match shard.shared.ip_limits.as_ref().map(|l| l.admit(peer.ip())) {
            None => None,
            Some(Ok(slot)) => Some(slot),
            Some(Err(why)) => {
                shard.metrics.handshake_failure(why.label());
                monoio::spawn(conn::refuse_ip(stream, why, tls.is_some()));
                continue;
            }
        };
        let over = shard.conns.borrow().len() >= max;
        monoio::spawn(conn::serve(shard.clone(), stream, over, tls.clone(), slot));
    }
}

/// After accepting stops: close idle connections, let running generations finish until
/// `shutdown_timeout`, then close what is left with 1001.
async fn drain(shard: &Rc<Shard>) {
    let deadline = Instant::now() + shard.shared.config.server.shutdown_timeout;
    // With a shared store, resumable generations move to another instance at once.
    let handed = crate::session::journal::hand_over(shard);
    let conns: Vec<Rc<Conn>> = shard
        .conns
        .borrow()
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    for c in conns {
        conn::begin_shutdown(shard, &c, &handed);
    }
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(TICK).await;
    }
    let conns: Vec<Rc<Conn>> = shard
        .conns
        .borrow()
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    for c in conns {
        conn::force_close(shard, &c, "going_away");
    }
    let until = Instant::now() + Duration::from_millis(500);
    while !shard.conns.borrow().is_empty() && Instant::now() < until {
        monoio::time::sleep(TICK).await;
    }
}

/// Events routed between two backpressure checks when the engine keeps the queue full.
const DISPATCH_SLICE: u32 = 1024;

/// Drains token events from the engine and routes them to connections.
async fn dispatch(shard: Rc<Shard>) {
    let wake = shard.link.borrow().wake.clone();
    loop {
        wake.wait().await;
        // One clock read per batch: every event of an engine step arrived together.
        let now = Instant::now();
        let mut n = 0u32;
        loop {
            let ev = shard.link.borrow_mut().events.pop();
            let Ok(ev) = ev else { break };
            crate::session::request::on_event(&shard, ev, now);
            n += 1;
            if n.is_multiple_of(DISPATCH_SLICE) {
                // A fast engine can keep the queue full: check backpressure as we go.
                shard.flush_dirty();
            }
        }
        shard.flush_dirty();
    }
}

/// Timeouts, heartbeats, chunk latency caps, deferred control messages, shutdown.
async fn tick(shard: Rc<Shard>) {
    let mut conns: Vec<Rc<Conn>> = Vec::new();
    let mut n: u64 = 0;
    let throttle = shard.shared.config.session.throttle_delay;
    let throttle_ticks = (throttle.as_millis() / TICK.as_millis()).max(1) as u64;
    loop {
        monoio::time::sleep(TICK).await;
        n += 1;
        let backlog: Vec<EngineMsg> = shard.backlog.borrow_mut().drain(..).collect();
        for m in backlog {
            shard.send_control(m);
        }
        let now = Instant::now();
        if shard.shared.shutdown.load(Ordering::Acquire) && !shard.draining.get() {
            let seen = shard.shutdown_seen.get().unwrap_or(now);
            shard.shutdown_seen.set(Some(seen));
            if now >= seen + shard.shared.config.server.drain_delay {
                shard.draining.set(true);
                std::mem::replace(&mut *shard.accept_cancel.borrow_mut(), Canceller::new())
                    .cancel();
            }
        }
        // Connection timers need 100 ms resolution; chunk latency caps need the 10 ms tick.
        if n.is_multiple_of(10) || shard.draining.get() {
            let now_us = shard.now_us();
            conns.clear();
            conns.extend(shard.conns.borrow().iter().map(|(_, c)| c.clone()));
            let mut queued = 0;
            for c in &conns {
                conn::on_tick(&shard, c, now, now_us);
                queued += c.queued_bytes();
            }
            shard.metrics.queued_output_bytes.set(queued as u64);
            conns.clear();
            sample_load(&shard, now);
        }
        if n.is_multiple_of(throttle_ticks) {
            crate::session::flow::on_throttle_tick(&shard);
        }
        crate::session::request::flush_stale_chunks(&shard, now);
        crate::session::journal::publish_staged(&shard);
        if n.is_multiple_of(5) {
            crate::session::journal::on_tick(&shard, now);
        }
        shard.flush_dirty();
    }
}

/// This thread's CPU time (user + system).
pub fn thread_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass; RUSAGE_THREAD is Linux's per-thread usage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The shard's CPU load over the last sample, and the zstd level that goes with it.
fn sample_load(shard: &Shard, now: Instant) {
    let cpu = thread_cpu_time();
    let (then, cpu_then) = shard.cpu_sample.replace((now, cpu));
    let wall = now.duration_since(then).as_secs_f64();
    if wall <= 0.0 {
        return;
    }
    let load = (cpu.saturating_sub(cpu_then).as_secs_f64() / wall).min(1.0);
    let level =
        crate::session::compress::level_for_load(&shard.shared.config.session.compression, load);
    shard.zstd_level.set(level);
    shard.metrics.zstd_level.set(level.unwrap_or(0) as u64);
    shard.pools.trim(&shard.shared.compression);
    shard.metrics.cpu_load_permille.set((load * 1000.0) as u64);
}
