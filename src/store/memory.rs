//! The embedded store: the logs in this process's memory (resume on the same instance only).
//!
//! Bounded twice: a log expires `resume_ttl` after its last write, and when the logs together
//! pass `memory_store_max_mb` the ones closest to expiry are evicted first (a resume of an
//! evicted generation is `unknown_id`; an owner whose log was evicted marks it not resumable).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::local::{GenLog, LocalLog, LogCounters, LOG_OVERHEAD};
use super::{
    Appended, Batch, Claim, Claimed, Found, GenId, Lease, Lookup, Renewed, Start, StateStore,
    StoreError, Ttls,
};

/// How often expired logs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A session outlives its generations' logs by up to this much: extending it on every renewal
/// would cost a second map lookup each; this way it is once per generation per slack.
const SESSION_SLACK: Duration = Duration::from_millis(500);

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A generation's metadata (the log itself is shared with the shard that writes it).
struct Gen {
    session: Arc<str>,
    /// The session's expiry as this generation last extended it.
    session_until: Instant,
    lease_until: Instant,
    request: Bytes,
    log: LocalLog,
    cancel: bool,
    watched_at: Option<Instant>,
    /// `resume_ttl` after the last write or renewal.
    expires: Instant,
    /// Bytes counted for the metadata.
    meta: usize,
}

pub struct MemoryStore {
    gens: HashMap<GenId, Gen>,
    /// Generations in start order: the sweep and the eviction take from the front.
    order: VecDeque<GenId>,
    sessions: HashMap<Arc<str>, ([u8; 32], Instant)>,
    ttls: Ttls,
    max_bytes: usize,
    /// Bytes the logs (counting themselves) and their metadata hold, messages appended.
    counters: Arc<LogCounters>,
    last_sweep: Instant,
}

impl MemoryStore {
    pub fn new(ttls: Ttls, max_bytes: usize) -> Self {
        MemoryStore {
            gens: HashMap::default(),
            order: VecDeque::new(),
            sessions: HashMap::default(),
            ttls,
            max_bytes,
            counters: Arc::default(),
            last_sweep: Instant::now(),
        }
    }

    /// Bytes the logs hold now (what the shards published into them included).
    pub fn bytes(&self) -> usize {
        usize::try_from(self.counters.bytes.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn add_meta(&self, n: usize) {
        self.counters.bytes.fetch_add(n as i64, Ordering::Relaxed);
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
        while self.bytes() > self.max_bytes {
            let Some(victim) = self.order.pop_front() else {
                return;
            };
            if let Some(g) = self.gens.remove(&victim) {
                self.drop_gen(g);
            }
        }
    }

    /// Frees a removed generation's log (its owner's next append finds it gone).
    fn drop_gen(&mut self, g: Gen) {
        if let Ok(mut l) = g.log.lock() {
            l.close();
        }
        self.counters
            .bytes
            .fetch_sub(g.meta as i64, Ordering::Relaxed);
    }

    /// The log lives on: `resume_ttl` from now, and its session at least as long.
    fn touch(g: &mut Gen, sessions: &mut HashMap<Arc<str>, ([u8; 32], Instant)>, until: Instant) {
        g.expires = until;
        if g.expires > g.session_until {
            g.session_until = g.expires + SESSION_SLACK;
            if let Some(s) = sessions.get_mut(&g.session) {
                s.1 = s.1.max(g.session_until);
            }
        }
    }

    /// Applies entry `i` of `b` (a write through the trait: the shards append in place).
    fn append(&mut self, b: &Batch, i: usize, now: Instant) -> Appended {
        let a = &b.gens[i];
        let Some(g) = self.gens.get_mut(&a.gen).filter(|g| g.expires > now) else {
            return Appended::Gone;
        };
        let Ok(mut log) = g.log.lock() else {
            return Appended::Gone;
        };
        if log.closed() {
            return Appended::Gone;
        }
        if log.epoch != a.epoch {
            return Appended::Fenced;
        }
        if a.count == 0 || a.last_seq() <= log.last_seq {
            return Appended::Duplicate;
        }
        let mut r = Appended::Ok;
        for (seq, (text, tokens)) in (a.first_seq..).zip(b.msgs(i)) {
            let done = a.done && seq == a.last_seq();
            match log.append(a.epoch, seq, &[], text, tokens, done) {
                Appended::Ok | Appended::Duplicate => {}
                other => {
                    r = other;
                    break;
                }
            }
        }
        drop(log);
        Self::touch(g, &mut self.sessions, now + self.ttls.log);
        r
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
            let log = s
                .log
                .clone()
                .unwrap_or_else(|| GenLog::shared(1, self.counters.clone(), 0));
            let meta = s.request.len() + s.gen.len() + LOG_OVERHEAD;
            if let Some(old) = self.gens.insert(
                s.gen.clone(),
                Gen {
                    session: s.session.clone(),
                    session_until,
                    lease_until: now + self.ttls.lease,
                    request: s.request.clone(),
                    log,
                    cancel: false,
                    watched_at: None,
                    expires,
                    meta,
                },
            ) {
                self.drop_gen(old);
            }
            self.order.push_back(s.gen.clone());
            // The log counts its own bytes.
            self.add_meta(meta);
        }
        let mut out = Vec::with_capacity(batches.iter().map(|b| b.gens.len()).sum());
        for b in batches {
            for i in 0..b.gens.len() {
                out.push(self.append(b, i, now));
            }
        }
        self.evict_over_cap();
        Ok(out)
    }

    fn renew(&mut self, leases: &[Lease]) -> Result<Vec<Renewed>, StoreError> {
        let now = Instant::now();
        self.sweep(now);
        let until = now + self.ttls.log;
        let mut out = Vec::with_capacity(leases.len());
        for l in leases {
            let r = match self.gens.get_mut(&l.gen) {
                Some(g) if g.log.lock().is_ok_and(|log| log.epoch == l.epoch) => {
                    g.lease_until = now + self.ttls.lease;
                    // An owner renews while it writes: the log's expiry counts from here.
                    Self::touch(g, &mut self.sessions, until);
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
            };
            out.push(r);
        }
        self.evict_over_cap();
        Ok(out)
    }

    fn release(&mut self, leases: &[Lease]) -> Result<(), StoreError> {
        let now = Instant::now();
        for l in leases {
            if let Some(g) = self.gens.get_mut(&l.gen) {
                if g.log.lock().is_ok_and(|log| log.epoch == l.epoch) {
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
            .and_then(|g| {
                g.watched_at = Some(now);
                let mut log = g.log.lock().ok()?;
                // From now on its owner hands each new message to the state thread too (the
                // follow this lookup starts gets them pushed).
                log.followed = true;
                Some(Found {
                    msgs: log.after(after, limit),
                    last_seq: log.last_seq,
                    trimmed: log.trimmed,
                    done: log.done,
                    broken: log.broken,
                    epoch: log.epoch,
                    lease_expired: !log.done && g.lease_until <= now,
                })
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
        let Ok(mut log) = g.log.lock() else {
            return Ok(Claim::Over);
        };
        if log.done || log.broken || log.closed() {
            return Ok(Claim::Over);
        }
        if log.epoch != epoch || g.lease_until > now {
            return Ok(Claim::Busy);
        }
        // The old owner's next append is refused (fenced) from here on.
        log.epoch += 1;
        g.lease_until = now + self.ttls.lease;
        g.cancel = false;
        Ok(Claim::Claimed(Claimed {
            epoch: log.epoch,
            request: g.request.clone(),
            tokens: log.tokens(),
            last_seq: log.last_seq,
            log: Some(g.log.clone()),
        }))
    }

    fn cancel(&mut self, gen: &str) -> Result<(), StoreError> {
        if let Some(g) = self.gens.get_mut(gen) {
            g.cancel = true;
        }
        Ok(())
    }

    fn request(&mut self, gen: &str) -> Result<Option<Bytes>, StoreError> {
        let now = Instant::now();
        Ok(self
            .gens
            .get(gen)
            .filter(|g| g.expires > now)
            .map(|g| g.request.clone()))
    }

    fn delete(&mut self, gen: &str) -> Result<(), StoreError> {
        // Its place in the start order goes with the sweep (a missing entry is skipped).
        if let Some(g) = self.gens.remove(gen) {
            self.drop_gen(g);
        }
        Ok(())
    }

    fn trim(&mut self, gen: &str, upto: u64) -> Result<(), StoreError> {
        let Some(g) = self.gens.get(gen) else {
            return Ok(());
        };
        if let Ok(mut log) = g.log.lock() {
            log.trim(upto);
        }
        Ok(())
    }

    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError> {
        if let Some(g) = self.gens.get(gen) {
            if let Ok(mut log) = g.log.lock() {
                log.broken = true;
            }
        }
        Ok(())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn local(&self) -> Option<Arc<LogCounters>> {
        Some(self.counters.clone())
    }
}
