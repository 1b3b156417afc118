//! The embedded store: the logs in this process's memory (resume on the same instance only).
//!
//! Bounded twice: a log expires `resume_ttl` after its last write, and when the logs together
//! pass `memory_store_max_mb` the ones closest to expiry are evicted first (a resume of an
//! evicted generation is `unknown_id`; an owner whose log was evicted marks it not resumable).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Append, Appended, Claim, Claimed, Found, GenId, Lease, Lookup, Renewed, Start, StateStore,
    StoreError, Ttls,
};

/// How often expired logs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Bytes counted per message besides its text (map entry, seq).
const MSG_OVERHEAD: usize = 32;

struct Gen {
    session: Arc<str>,
    epoch: u64,
    lease_until: Instant,
    request: Bytes,
    log: VecDeque<(u64, Bytes)>,
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
    ttls: Ttls,
    max_bytes: usize,
    bytes: usize,
    last_sweep: Instant,
}

impl MemoryStore {
    pub fn new(ttls: Ttls, max_bytes: usize) -> Self {
        MemoryStore {
            gens: HashMap::new(),
            order: VecDeque::new(),
            sessions: HashMap::new(),
            ttls,
            max_bytes,
            bytes: 0,
            last_sweep: Instant::now(),
        }
    }

    /// Bytes the logs hold now.
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
                        self.bytes -= g.bytes;
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
                self.bytes -= g.bytes;
            }
        }
    }

    fn append(&mut self, a: &Append, now: Instant) -> Appended {
        let Some(g) = self.gens.get_mut(&a.gen).filter(|g| g.expires > now) else {
            return Appended::Gone;
        };
        if g.epoch != a.epoch {
            return Appended::Fenced;
        }
        if a.msgs.is_empty() || a.last_seq() <= g.last_seq {
            return Appended::Duplicate;
        }
        if a.first_seq != g.last_seq + 1 || g.broken || g.done {
            g.broken = true;
            return Appended::Gap;
        }
        for (i, m) in a.msgs.iter().enumerate() {
            g.log.push_back((a.first_seq + i as u64, m.clone()));
            g.bytes += m.len() + MSG_OVERHEAD;
            self.bytes += m.len() + MSG_OVERHEAD;
        }
        g.tokens.extend_from_slice(&a.tokens);
        g.bytes += a.tokens.len() * 4;
        self.bytes += a.tokens.len() * 4;
        g.last_seq = a.last_seq();
        g.done = a.done;
        g.expires = now + self.ttls.log;
        if let Some(s) = self.sessions.get_mut(&g.session) {
            s.1 = g.expires;
        }
        Appended::Ok
    }
}

impl StateStore for MemoryStore {
    fn write(&mut self, starts: &[Start], appends: &[Append]) -> Result<Vec<Appended>, StoreError> {
        let now = Instant::now();
        self.sweep(now);
        for s in starts {
            let expires = now + self.ttls.log;
            self.sessions
                .insert(s.session.clone(), (s.token_hash, expires));
            let bytes = s.request.len() + s.gen.len() + 256;
            if let Some(old) = self.gens.insert(
                s.gen.clone(),
                Gen {
                    session: s.session.clone(),
                    epoch: 1,
                    lease_until: now + self.ttls.lease,
                    request: s.request.clone(),
                    log: VecDeque::new(),
                    last_seq: 0,
                    trimmed: 0,
                    tokens: Vec::new(),
                    done: false,
                    broken: false,
                    cancel: false,
                    watched_at: None,
                    expires,
                    bytes,
                },
            ) {
                self.bytes -= old.bytes;
            }
            self.order.push_back(s.gen.clone());
            self.bytes += bytes;
        }
        let out = appends.iter().map(|a| self.append(a, now)).collect();
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
                    msgs: g
                        .log
                        .iter()
                        .filter(|(s, _)| *s > after)
                        .take(limit)
                        .cloned()
                        .collect(),
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
            while g.log.front().is_some_and(|(s, _)| *s <= upto) {
                if let Some((_, m)) = g.log.pop_front() {
                    g.bytes -= m.len() + MSG_OVERHEAD;
                    self.bytes -= m.len() + MSG_OVERHEAD;
                }
            }
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
