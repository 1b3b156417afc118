//! Per-tenant limits (SPEC 4 "tenants"): requests per minute, tokens per minute, concurrent
//! streams, connections. One [`TenantState`] per tenant is shared by every shard of the
//! instance; a check touches a few atomics once per request (or connection), never per token.
//!
//! Rates are GCRA buckets (a token bucket kept as one "theoretical arrival time"): a tenant may
//! burst its whole per-minute allowance at once, then gets it back evenly over the minute. Tokens
//! are charged up front as prompt + `max_tokens` and the unused part is refunded when the
//! generation ends ([`Charge`] does both on drop, whichever way the request ends).
//!
//! With a shared store the limits hold across instances too: the state thread publishes this
//! instance's usage every `tenant_sync_ms` and applies what the others used in the meantime to
//! the same buckets ([`TenantState::apply_remote`]) and their open streams and connections to
//! the concurrency caps ([`TenantState::set_remote`]). A limit is then exact within one
//! instance and overshoots across instances by at most what they admit in one sync interval.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The limits of one tenant (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    pub max_connections: Option<u32>,
}

const MINUTE_NS: u64 = 60_000_000_000;

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Offset by a minute so a fresh bucket starts full (its arrival time 0 is a minute ago).
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + MINUTE_NS
}

/// A per-minute rate: `per_minute` units, bursting up to all of them.
#[derive(Debug)]
struct Gcra {
    per_minute: u64,
    /// When the bucket is full again, in ns (the theoretical arrival time).
    tat: AtomicU64,
}

impl Gcra {
    fn new(per_minute: u32) -> Self {
        Self {
            per_minute: u64::from(per_minute.max(1)),
            tat: AtomicU64::new(0),
        }
    }

    fn cost_ns(&self, units: u64) -> u64 {
        units.saturating_mul(MINUTE_NS) / self.per_minute
    }

    /// Takes `units`; `Err(wait)`: not before `wait` from now.
    fn take(&self, now: u64, units: u64) -> Result<(), Duration> {
        let cost = self.cost_ns(units);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now) + cost;
            let limit = now + MINUTE_NS;
            if new > limit {
                return Err(Duration::from_nanos(new - limit));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(cur) => tat = cur,
            }
        }
    }

    /// Takes `units` that another instance already admitted: never refuses, so the bucket may
    /// run past full and this instance waits for it.
    fn force(&self, now: u64, units: u64) {
        let cost = self.cost_ns(units);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.max(now).saturating_add(cost))
            });
    }

    /// Gives back `units` taken earlier.
    fn give(&self, units: u64) {
        let cost = self.cost_ns(units);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(cost))
            });
    }
}

/// Which limit refused, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Requests {
        retry_after: Duration,
    },
    Tokens {
        retry_after: Duration,
    },
    /// One request asks for more tokens than a minute allows: it can never pass.
    TooLarge {
        tokens: u64,
        per_minute: u32,
    },
    Streams {
        max: u32,
    },
    Connections {
        max: u32,
    },
}

/// When a concurrency limit refuses, the client is told to retry after this.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

impl Limited {
    /// The `error.code` (WebSocket and HTTP).
    pub const fn code(&self) -> &'static str {
        match self {
            Limited::TooLarge { .. } => "request_too_large",
            _ => "rate_limited",
        }
    }

    /// Which limit: the metric label and the error's `limit` field.
    pub const fn limit(&self) -> &'static str {
        match self {
            Limited::Requests { .. } => "requests_per_minute",
            Limited::Tokens { .. } | Limited::TooLarge { .. } => "tokens_per_minute",
            Limited::Streams { .. } => "max_concurrent_streams",
            Limited::Connections { .. } => "max_connections",
        }
    }

    /// `None` for a request that can never pass.
    pub fn retry_after(&self) -> Option<Duration> {
        match *self {
            Limited::Requests { retry_after } | Limited::Tokens { retry_after } => {
                Some(retry_after.max(Duration::from_millis(1)))
            }
            Limited::TooLarge { .. } => None,
            Limited::Streams { .. } | Limited::Connections { .. } => Some(CONCURRENCY_RETRY),
        }
    }

    /// `Retry-After` in whole seconds (rounded up).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after()
            .map(|d| d.as_millis().div_ceil(1000).max(1) as u64)
    }

    pub fn message(&self, tenant: &str) -> String {
        match self {
            Limited::Requests { .. } | Limited::Tokens { .. } => format!(
                "tenant {tenant:?} is over its {} limit; retry after {} ms",
                self.limit(),
                self.retry_after().map_or(0, |d| d.as_millis())
            ),
            Limited::TooLarge { tokens, per_minute } => format!(
                "this request needs {tokens} tokens (prompt + max_tokens) but tenant {tenant:?} \
                 may use {per_minute} per minute: lower max_tokens"
            ),
            Limited::Streams { max } => {
                format!("tenant {tenant:?} already has {max} streams running (its limit)")
            }
            Limited::Connections { max } => {
                format!("tenant {tenant:?} already has {max} connections open (its limit)")
            }
        }
    }
}

/// A tenant's counters, shared by all shards.
#[derive(Debug)]
pub struct TenantState {
    pub limits: TenantLimits,
    rpm: Option<Gcra>,
    tpm: Option<Gcra>,
    streams: AtomicU32,
    conns: AtomicU32,
    /// Streams and connections the other instances hold (shared store; 0 otherwise).
    remote_streams: AtomicU32,
    remote_conns: AtomicU32,
    /// Requests admitted, refusals by limit (in [`Limited::limit`] order), tokens charged.
    pub admitted: AtomicU64,
    pub refused: [AtomicU64; 4],
    pub tokens_charged: AtomicU64,
    /// Ended requests by outcome (`metrics::OUTCOMES` order), for `seedance_requests_total`.
    pub outcomes: [AtomicU64; 5],
}

pub const LIMIT_LABELS: [&str; 4] = [
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_streams",
    "max_connections",
];

impl PartialEq for TenantState {
    fn eq(&self, other: &Self) -> bool {
        self.limits == other.limits
    }
}

impl Eq for TenantState {}

/// Takes one unit of a concurrency counter unless it is at `max` (less what other instances
/// hold).
fn acquire(counter: &AtomicU32, max: Option<u32>, remote: &AtomicU32) -> bool {
    match max {
        None => {
            counter.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(max) => {
            let max = max.saturating_sub(remote.load(Ordering::Relaxed));
            counter
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        }
    }
}

impl TenantState {
    pub fn new(limits: TenantLimits) -> Self {
        Self {
            limits,
            rpm: limits.requests_per_minute.map(Gcra::new),
            tpm: limits.tokens_per_minute.map(Gcra::new),
            streams: AtomicU32::new(0),
            conns: AtomicU32::new(0),
            remote_streams: AtomicU32::new(0),
            remote_conns: AtomicU32::new(0),
            admitted: AtomicU64::new(0),
            refused: Default::default(),
            tokens_charged: AtomicU64::new(0),
            outcomes: Default::default(),
        }
    }

    fn refuse(&self, why: Limited) -> Limited {
        if let Some(i) = LIMIT_LABELS.iter().position(|l| *l == why.limit()) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
        why
    }

    /// Admits a request that may use `tokens` (prompt + max_tokens): a stream slot, a request
    /// and the tokens, or nothing and why.
    pub fn admit(self: &Arc<Self>, tokens: u64) -> Result<Charge, Limited> {
        if let (Some(_), Some(per_minute)) = (&self.tpm, self.limits.tokens_per_minute) {
            if tokens > u64::from(per_minute) {
                return Err(self.refuse(Limited::TooLarge { tokens, per_minute }));
            }
        }
        if !acquire(
            &self.streams,
            self.limits.max_concurrent_streams,
            &self.remote_streams,
        ) {
            let max = self.limits.max_concurrent_streams.unwrap_or(0);
            return Err(self.refuse(Limited::Streams { max }));
        }
        let now = now_ns();
        if let Some(rpm) = &self.rpm {
            if let Err(retry_after) = rpm.take(now, 1) {
                self.streams.fetch_sub(1, Ordering::Relaxed);
                return Err(self.refuse(Limited::Requests { retry_after }));
            }
        }
        if let Some(tpm) = &self.tpm {
            if let Err(retry_after) = tpm.take(now, tokens) {
                if let Some(rpm) = &self.rpm {
                    rpm.give(1);
                }
                self.streams.fetch_sub(1, Ordering::Relaxed);
                return Err(self.refuse(Limited::Tokens { retry_after }));
            }
        }
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.tokens_charged.fetch_add(tokens, Ordering::Relaxed);
        Ok(Charge {
            state: self.clone(),
            charged: tokens,
            used: 0,
        })
    }

    /// Takes a connection slot.
    pub fn connect(self: &Arc<Self>) -> Result<ConnSlot, Limited> {
        if acquire(&self.conns, self.limits.max_connections, &self.remote_conns) {
            Ok(ConnSlot {
                state: self.clone(),
            })
        } else {
            let max = self.limits.max_connections.unwrap_or(0);
            Err(self.refuse(Limited::Connections { max }))
        }
    }

    /// Counts an ended request of this tenant under `label` (a `metrics::OUTCOMES` entry).
    pub fn outcome(&self, label: &str) {
        let i = crate::metrics::OUTCOMES
            .iter()
            .position(|r| *r == label)
            .unwrap_or(3);
        if let Some(c) = self.outcomes.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn streams(&self) -> u32 {
        self.streams.load(Ordering::Relaxed)
    }

    /// What the other instances used since the last sync: `requests` admitted and `tokens`
    /// charged net of refunds (negative: they refunded more than they charged).
    pub fn apply_remote(&self, requests: i64, tokens: i64) {
        let now = now_ns();
        if let Some(rpm) = &self.rpm {
            if requests > 0 {
                rpm.force(now, requests as u64);
            } else if requests < 0 {
                rpm.give(requests.unsigned_abs());
            }
        }
        if let Some(tpm) = &self.tpm {
            if tokens > 0 {
                tpm.force(now, tokens as u64);
            } else if tokens < 0 {
                tpm.give(tokens.unsigned_abs());
            }
        }
    }

    /// The streams and connections the other instances hold now.
    pub fn set_remote(&self, streams: u32, conns: u32) {
        self.remote_streams.store(streams, Ordering::Relaxed);
        self.remote_conns.store(conns, Ordering::Relaxed);
    }

    pub fn connections(&self) -> u32 {
        self.conns.load(Ordering::Relaxed)
    }
}

/// An admitted request's hold on its tenant: its stream slot and the tokens charged. Dropped
/// when the request ends (any way): the slot is freed and the tokens not used are refunded.
#[derive(Debug)]
pub struct Charge {
    state: Arc<TenantState>,
    charged: u64,
    /// Tokens the request really used (prompt + generated), set when it ends.
    pub used: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let unused = self.charged.saturating_sub(self.used);
        if let Some(tpm) = &self.state.tpm {
            tpm.give(unused);
        }
        self.state
            .tokens_charged
            .fetch_sub(unused, Ordering::Relaxed);
        self.state.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's hold on its tenant's connection limit.
#[derive(Debug)]
pub struct ConnSlot {
    state: Arc<TenantState>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.state.conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-IP connection limits (hostile clients): connections open at once and new connections
/// per second, for the whole instance. One lock per accepted connection (never per message);
/// entries go when an address has no connection open and a full allowance.
pub struct IpLimits {
    max_open: u32,
    per_second: u32,
    table: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, IpEntry>>,
}

#[derive(Debug, Default)]
struct IpEntry {
    open: u32,
    /// GCRA arrival time of the accept rate (ns).
    tat: u64,
}

/// Why an address may not connect now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    TooMany { max: u32 },
    TooFast { retry_after: Duration },
}

impl IpRefusal {
    pub const fn label(&self) -> &'static str {
        match self {
            IpRefusal::TooMany { .. } => "ip_connections",
            IpRefusal::TooFast { .. } => "ip_rate",
        }
    }

    pub fn retry_after_secs(&self) -> u64 {
        match self {
            IpRefusal::TooMany { .. } => 1,
            IpRefusal::TooFast { retry_after } => {
                retry_after.as_millis().div_ceil(1000).max(1) as u64
            }
        }
    }
}

impl IpLimits {
    /// `None` when both limits are off (0).
    pub fn new(max_open: u32, per_second: u32) -> Option<Arc<Self>> {
        (max_open > 0 || per_second > 0).then(|| {
            Arc::new(Self {
                max_open,
                per_second,
                table: Default::default(),
            })
        })
    }

    /// Admits a new connection from `ip`; the slot is released when dropped.
    pub fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<IpSlot, IpRefusal> {
        let now = now_ns();
        let Ok(mut table) = self.table.lock() else {
            // A poisoned lock (a panic elsewhere): do not lock every client out.
            return Ok(IpSlot { limits: None, ip });
        };
        let e = table.entry(ip).or_default();
        if self.max_open > 0 && e.open >= self.max_open {
            return Err(IpRefusal::TooMany { max: self.max_open });
        }
        if self.per_second > 0 {
            // A burst of one second's allowance, then `per_second` a second.
            let cost = 1_000_000_000 / u64::from(self.per_second);
            let new = e.tat.max(now) + cost;
            let limit = now + 1_000_000_000;
            if new > limit {
                return Err(IpRefusal::TooFast {
                    retry_after: Duration::from_nanos(new - limit),
                });
            }
            e.tat = new;
        }
        e.open += 1;
        if table.len() > 4096 {
            // Forget addresses with nothing open whose allowance is full again.
            table.retain(|_, e| e.open > 0 || e.tat > now);
        }
        Ok(IpSlot {
            limits: Some(self.clone()),
            ip,
        })
    }

    pub fn addresses(&self) -> usize {
        self.table.lock().map_or(0, |t| t.len())
    }
}

/// A connection's place in its address's count.
pub struct IpSlot {
    limits: Option<Arc<IpLimits>>,
    ip: std::net::IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(l) = &self.limits else { return };
        if let Ok(mut t) = l.table.lock() {
            let now = now_ns();
            if let Some(e) = t.get_mut(&self.ip) {
                e.open = e.open.saturating_sub(1);
                if e.open == 0 && e.tat <= now {
                    t.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_limits_cap_open_connections_and_the_accept_rate() {
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let other: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let l = IpLimits::new(3, 0).unwrap();
        let slots: Vec<_> = (0..3).map(|_| l.admit(ip).unwrap()).collect();
        assert_eq!(l.admit(ip).err(), Some(IpRefusal::TooMany { max: 3 }));
        assert!(l.admit(other).is_ok(), "another address is not affected");
        drop(slots);
        assert!(l.admit(ip).is_ok());
        assert_eq!(l.addresses(), 0, "entries go with their last connection");
        let r = IpLimits::new(0, 10).unwrap();
        let held: Vec<_> = (0..10).map(|_| r.admit(ip).unwrap()).collect();
        let e = r.admit(ip).err().unwrap();
        assert_eq!((e.label(), e.retry_after_secs()), ("ip_rate", 1));
        drop(held);
        assert!(r.admit(ip).is_err(), "closing does not give rate back");
        assert!(IpLimits::new(0, 0).is_none());
    }

    fn state(l: TenantLimits) -> Arc<TenantState> {
        Arc::new(TenantState::new(l))
    }

    #[test]
    fn requests_per_minute_burst_then_refill() {
        let s = state(TenantLimits {
            requests_per_minute: Some(60),
            ..Default::default()
        });
        let held: Vec<Charge> = (0..60).map(|_| s.admit(0).unwrap()).collect();
        let e = s.admit(0).unwrap_err();
        assert_eq!(e.limit(), "requests_per_minute");
        // One request comes back every second.
        let wait = e.retry_after().unwrap();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(e.retry_after_secs(), Some(1));
        drop(held); // ending requests does not give rate back
        assert!(s.admit(0).is_err());
        assert_eq!(s.refused[0].load(Ordering::Relaxed), 2);
    }

    #[test]
    fn tokens_are_charged_up_front_and_refunded_at_the_end() {
        let s = state(TenantLimits {
            tokens_per_minute: Some(1000),
            ..Default::default()
        });
        let mut a = s.admit(600).unwrap();
        assert_eq!(s.admit(600).unwrap_err().limit(), "tokens_per_minute");
        // It used 100 of its 600: 500 come back.
        a.used = 100;
        drop(a);
        let b = s.admit(600).unwrap();
        assert_eq!(s.tokens_charged.load(Ordering::Relaxed), 700);
        drop(b);
        // More than a minute's worth can never pass: a different error, no retry.
        let e = s.admit(1001).unwrap_err();
        assert_eq!((e.code(), e.retry_after()), ("request_too_large", None));
    }

    #[test]
    fn other_instances_usage_counts_against_the_same_limits() {
        let s = state(TenantLimits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1000),
            max_concurrent_streams: Some(3),
            max_connections: Some(2),
        });
        // Others admitted 8 requests and 900 tokens, and hold 2 streams and 2 connections.
        s.apply_remote(8, 900);
        s.set_remote(2, 2);
        let one = s
            .admit(50)
            .expect("1 stream of 3, 9 requests of 10, 950 tokens of 1000");
        assert_eq!(s.admit(10).unwrap_err().limit(), "max_concurrent_streams");
        assert_eq!(s.connect().unwrap_err().limit(), "max_connections");
        s.set_remote(0, 0);
        assert_eq!(s.admit(100).unwrap_err().limit(), "tokens_per_minute");
        // Their refunds come back here too.
        s.apply_remote(0, -500);
        let two = s.admit(100).expect("the refund made room");
        assert_eq!(s.admit(0).unwrap_err().limit(), "requests_per_minute");
        drop((one, two));
    }

    #[test]
    fn concurrency_and_connections_are_released_on_drop() {
        let s = state(TenantLimits {
            max_concurrent_streams: Some(2),
            max_connections: Some(1),
            ..Default::default()
        });
        let a = s.admit(10).unwrap();
        let b = s.admit(10).unwrap();
        let e = s.admit(10).unwrap_err();
        assert_eq!(
            (e.limit(), e.retry_after_secs()),
            ("max_concurrent_streams", Some(1))
        );
        drop(a);
        let _c = s.admit(10).unwrap();
        drop(b);
        assert_eq!(s.streams(), 1);
        let conn = s.connect().unwrap();
        assert_eq!(s.connect().unwrap_err().limit(), "max_connections");
        drop(conn);
        assert!(s.connect().is_ok());
    }

    #[test]
    fn a_refused_token_charge_gives_the_request_back() {
        let s = state(TenantLimits {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            max_concurrent_streams: Some(5),
            ..Default::default()
        });
        let _a = s.admit(100).unwrap();
        // Refused for tokens: neither the request nor the stream slot stays taken.
        assert_eq!(s.admit(50).unwrap_err().limit(), "tokens_per_minute");
        assert_eq!(s.streams(), 1);
        assert!(
            s.admit(0).is_ok(),
            "the second request of the minute is still there"
        );
    }

    #[test]
    fn shards_share_one_limit() {
        let s = state(TenantLimits {
            requests_per_minute: Some(1000),
            ..Default::default()
        });
        let ok = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        if let Ok(c) = s.admit(0) {
                            ok.fetch_add(1, Ordering::Relaxed);
                            drop(c);
                        }
                    }
                });
            }
        });
        // 2,000 tries from four threads: the minute's 1,000 (plus what refilled meanwhile).
        let n = ok.load(Ordering::Relaxed);
        assert!((1000..1010).contains(&n), "{n}");
    }
}
