//! The shared store: Redis (`--redis-url`), one synchronous RESP3 connection owned by the state
//! thread, every batch one pipeline.
//!
//! Layout per generation `G` (all keys of one generation share the hash tag `{g:G}`, so a
//! generation lives in one Redis Cluster slot):
//! - `{g:G}:m` hash — `ep` epoch, `own` owner instance, `lu` lease end (ms, Redis clock), `rq`
//!   the request, `nx` last logged seq, `tr` trimmed up to, `dn` done, `bad` not resumable,
//!   `cx` cancel asked, `w` last read by a resuming client (ms);
//! - `{g:G}:l` stream — one entry per append (the messages of one generation in one state-thread
//!   turn): id `0-<last seq>`, field `f` = its first seq, field `m` = the messages packed (u32 LE
//!   length + JSON each). XADD refuses an id not above the top, so no writer can rewrite
//!   history; one entry per append keeps Redis at one XADD per generation per turn, however
//!   many tokens the turn carried;
//! - `{g:G}:t` string — the generated token ids the logged messages cover (u32 LE each).
//!
//! and per session `S`: `{s:S}` = the hex SHA-256 of its resume token. Every write checks the
//! epoch inside a Lua script, so a fenced-off owner's late appends are refused. Leases run on
//! the Redis server's clock (`TIME`), so instances' clocks need not agree.

use std::time::Duration;

use bytes::Bytes;
use redis::{Connection, Pipeline, Value};

use super::{
    Appended, Batch, Claim, Claimed, Found, GenId, Lease, Lookup, Renewed, Start, StateStore,
    StoreError, Ttls,
};

const NOW: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + \
                   math.floor(tonumber(t[2]) / 1000) ";

const START: &str = "redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) \
    redis.call('HSET', KEYS[1], 'ep', 1, 'own', ARGV[1], 'rq', ARGV[2], 'lu', now + tonumber(ARGV[3]), \
      'nx', 0, 'tr', 0, 'dn', 0, 'bad', 0, 'cx', 0, 'w', 0) \
    redis.call('PEXPIRE', KEYS[1], ARGV[4]) return 1";

const APPEND: &str = "local m = redis.call('HMGET', KEYS[1], 'ep', 'nx', 'dn', 'bad') \
    if not m[1] then return -2 end \
    if m[1] ~= ARGV[1] then return -1 end \
    local nx = tonumber(m[2]) local first = tonumber(ARGV[3]) local n = tonumber(ARGV[7]) \
    if first + n - 1 <= nx then return 0 end \
    if first ~= nx + 1 or m[3] == '1' or m[4] == '1' then redis.call('HSET', KEYS[1], 'bad', 1) return -3 end \
    redis.call('XADD', KEYS[2], '0-' .. (first + n - 1), 'f', first, 'm', ARGV[6]) \
    if #ARGV[5] > 0 then redis.call('APPEND', KEYS[3], ARGV[5]) end \
    redis.call('HSET', KEYS[1], 'nx', first + n - 1, 'dn', ARGV[4]) \
    for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end return 1";

const RENEW: &str = "local m = redis.call('HMGET', KEYS[1], 'ep', 'cx', 'w') \
    if not m[1] or m[1] ~= ARGV[1] then return {1, 0, 0} end \
    redis.call('HSET', KEYS[1], 'lu', now + tonumber(ARGV[2])) \
    local w = 0 if tonumber(m[3]) > now - tonumber(ARGV[2]) then w = 1 end \
    return {0, tonumber(m[2]), w}";

const RELEASE: &str = "if redis.call('HGET', KEYS[1], 'ep') == ARGV[1] then \
    redis.call('HSET', KEYS[1], 'lu', 0) end return 1";

const LOOKUP: &str = "local m = redis.call('HMGET', KEYS[1], 'ep', 'nx', 'tr', 'dn', 'bad', 'lu') \
    if not m[1] then return false end \
    redis.call('HSET', KEYS[1], 'w', now) \
    local msgs = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+', 'COUNT', ARGV[2]) \
    local expired = 0 if m[4] ~= '1' and tonumber(m[6]) <= now then expired = 1 end \
    return {tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), tonumber(m[5]), expired, msgs}";

const CLAIM: &str = "local m = redis.call('HMGET', KEYS[1], 'ep', 'dn', 'bad', 'lu', 'nx', 'rq') \
    if not m[1] or m[2] == '1' or m[3] == '1' then return {2} end \
    if m[1] ~= ARGV[1] or tonumber(m[4]) > now then return {1} end \
    local ep = tonumber(m[1]) + 1 \
    redis.call('HSET', KEYS[1], 'ep', ep, 'own', ARGV[2], 'lu', now + tonumber(ARGV[3]), 'cx', 0) \
    return {0, ep, m[6], redis.call('GET', KEYS[2]) or '', tonumber(m[5])}";

const SET_FLAG: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then \
    redis.call('HSET', KEYS[1], ARGV[1], 1) end return 1";

const TRIM: &str = "local nx = redis.call('HGET', KEYS[1], 'nx') if not nx then return 0 end \
    local upto = math.min(tonumber(ARGV[1]), tonumber(nx)) \
    redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (upto + 1)) \
    if upto > tonumber(redis.call('HGET', KEYS[1], 'tr')) then redis.call('HSET', KEYS[1], 'tr', upto) end \
    return 1";

/// The scripts, loaded (SCRIPT LOAD) on every new connection; the index is [`Script`].
const SCRIPTS: [(&str, bool); 8] = [
    (START, true),
    (APPEND, false),
    (RENEW, true),
    (RELEASE, false),
    (LOOKUP, true),
    (CLAIM, true),
    (SET_FLAG, false),
    (TRIM, false),
];

#[derive(Clone, Copy)]
enum Script {
    Start,
    Append,
    Renew,
    Release,
    Lookup,
    Claim,
    SetFlag,
    Trim,
}

pub struct RedisStore {
    client: redis::Client,
    conn: Option<(Connection, Vec<String>)>,
    ttls: Ttls,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(format!("unexpected reply to {what}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<[u8; 32]> {
    let s = std::str::from_utf8(s).ok()?;
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        Value::Double(d) => Some(*d as i64),
        _ => None,
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// `f` (first seq) and `m` (packed messages) of a stream entry (a RESP3 map or a flat list).
fn entry_fields(v: &Value) -> Option<(u64, Bytes)> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Map(kv) => kv.iter().map(|(k, v)| (k, v)).collect(),
        v => array(v)?.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
    };
    let (mut first, mut packed) = (None, None);
    for (k, v) in pairs {
        match bytes_of(k)? {
            b"f" => first = int(v).map(|f| f as u64),
            b"m" => {
                packed = match v {
                    Value::BulkString(b) => Some(Bytes::from(b.clone())),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    Some((first?, packed?))
}

fn keys(gen: &str) -> [String; 3] {
    [
        format!("{{g:{gen}}}:m"),
        format!("{{g:{gen}}}:l"),
        format!("{{g:{gen}}}:t"),
    ]
}

/// The messages of one stream entry, numbered from `first`.
fn unpack(first: u64, packed: Bytes, into: &mut Vec<(u64, Bytes)>) -> Option<()> {
    let mut at = 0;
    let mut seq = first;
    while at < packed.len() {
        let len = u32::from_le_bytes(packed.get(at..at + 4)?.try_into().ok()?) as usize;
        packed.get(at + 4..at + 4 + len)?;
        into.push((seq, packed.slice(at + 4..at + 4 + len)));
        at += 4 + len;
        seq += 1;
    }
    Some(())
}

/// Consecutive entries of one generation in a turn's batches, written as one stream entry.
struct Run<'a> {
    gen: &'a GenId,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    done: bool,
    /// Its first entry in [`Runs::entries`]; each links to the next through [`Runs::next`].
    head: usize,
    tail: usize,
}

/// A turn's batch entries grouped by generation (one XADD per run, however many dispatches
/// the turn took), with no allocation per run.
struct Runs<'a> {
    runs: Vec<Run<'a>>,
    /// Every entry in order as (batch, entry), with the run it joined.
    entries: Vec<(usize, usize, usize)>,
    next: Vec<usize>,
}

const END: usize = usize::MAX;

fn group(batches: &[Batch]) -> Runs<'_> {
    let mut index: std::collections::HashMap<&str, usize, foldhash::fast::RandomState> =
        Default::default();
    let mut g = Runs {
        runs: Vec::new(),
        entries: Vec::new(),
        next: Vec::new(),
    };
    for (bi, b) in batches.iter().enumerate() {
        for (ei, e) in b.gens.iter().enumerate() {
            let at = g.entries.len();
            let joined = index.get(&*e.gen).copied().filter(|&r| {
                let run = &g.runs[r];
                run.epoch == e.epoch && !run.done && run.last_seq + 1 == e.first_seq
            });
            let r = match joined {
                Some(r) => {
                    let run = &mut g.runs[r];
                    g.next[run.tail] = at;
                    run.tail = at;
                    run.last_seq = e.last_seq();
                    run.done = e.done;
                    r
                }
                None => {
                    index.insert(&e.gen, g.runs.len());
                    g.runs.push(Run {
                        gen: &e.gen,
                        epoch: e.epoch,
                        first_seq: e.first_seq,
                        last_seq: e.last_seq(),
                        done: e.done,
                        head: at,
                        tail: at,
                    });
                    g.runs.len() - 1
                }
            };
            g.entries.push((bi, ei, r));
            g.next.push(END);
        }
    }
    g
}

impl Runs<'_> {
    /// Run `r`'s messages as one stream entry value (u32 LE length + text, each) and its
    /// tokens (u32 LE each).
    fn pack(&self, batches: &[Batch], r: usize, msgs: &mut Vec<u8>, tokens: &mut Vec<u8>) {
        msgs.clear();
        tokens.clear();
        let mut at = self.runs[r].head;
        while let Some(&(bi, ei, _)) = self.entries.get(at) {
            for (text, toks) in batches[bi].msgs(ei) {
                msgs.extend_from_slice(&(text.len() as u32).to_le_bytes());
                msgs.extend_from_slice(text);
                for t in toks {
                    tokens.extend_from_slice(&t.to_le_bytes());
                }
            }
            at = self.next[at];
        }
    }
}

impl RedisStore {
    /// Connects (and loads the scripts); an unreachable server is an error here.
    pub fn connect(url: &str, ttls: Ttls) -> Result<Self, StoreError> {
        let url = if url.contains("protocol=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        };
        let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
        let mut s = RedisStore {
            client,
            conn: None,
            ttls,
        };
        s.ensure()?;
        Ok(s)
    }

    fn ensure(&mut self) -> Result<(), StoreError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let mut c = self
            .client
            .get_connection_with_timeout(Duration::from_secs(1))
            .map_err(unavailable)?;
        let io = Some(Duration::from_secs(2));
        c.set_read_timeout(io).map_err(unavailable)?;
        c.set_write_timeout(io).map_err(unavailable)?;
        let mut shas = Vec::with_capacity(SCRIPTS.len());
        for (body, timed) in SCRIPTS {
            let src = if timed {
                format!("{NOW}{body}")
            } else {
                body.to_owned()
            };
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query(&mut c)
                .map_err(unavailable)?;
            shas.push(sha);
        }
        self.conn = Some((c, shas));
        Ok(())
    }

    /// Runs a pipeline; a failure drops the connection (the next call reconnects).
    fn run(
        &mut self,
        build: impl FnOnce(&mut Pipeline, &[String]),
    ) -> Result<Vec<Value>, StoreError> {
        self.ensure()?;
        let Some((conn, shas)) = self.conn.as_mut() else {
            return Err(unavailable("not connected"));
        };
        let mut p = redis::pipe();
        build(&mut p, shas);
        if p.is_empty() {
            return Ok(Vec::new());
        }
        match p.query::<Vec<Value>>(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn = None;
                Err(unavailable(e))
            }
        }
    }

    /// The generation names under a session key prefix are not enumerable; a test helper that
    /// wipes everything this store wrote in one database.
    pub fn flush_all(&mut self) -> Result<(), StoreError> {
        self.run(|p, _| {
            p.cmd("FLUSHDB");
        })
        .map(|_| ())
    }
}

fn evalsha<'a>(
    p: &'a mut Pipeline,
    shas: &[String],
    s: Script,
    keys: &[String],
) -> &'a mut Pipeline {
    p.cmd("EVALSHA").arg(&shas[s as usize]).arg(keys.len());
    for k in keys {
        p.arg(k);
    }
    p
}

impl StateStore for RedisStore {
    fn write(&mut self, starts: &[Start], batches: &[Batch]) -> Result<Vec<Appended>, StoreError> {
        let runs = group(batches);
        let (lease, ttl) = (
            self.ttls.lease.as_millis() as u64,
            self.ttls.log.as_millis() as u64,
        );
        let replies = self.run(|p, shas| {
            for s in starts {
                p.cmd("SET")
                    .arg(format!("{{s:{}}}", s.session))
                    .arg(hex(&s.token_hash))
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
                evalsha(p, shas, Script::Start, &keys(&s.gen))
                    .arg(&*s.owner)
                    .arg(&s.request[..])
                    .arg(lease)
                    .arg(ttl)
                    .ignore();
            }
            let (mut msgs, mut toks) = (Vec::new(), Vec::new());
            for (r, run) in runs.runs.iter().enumerate() {
                runs.pack(batches, r, &mut msgs, &mut toks);
                evalsha(p, shas, Script::Append, &keys(run.gen))
                    .arg(run.epoch)
                    .arg(ttl)
                    .arg(run.first_seq)
                    .arg(u8::from(run.done))
                    .arg(&toks[..])
                    .arg(&msgs[..])
                    .arg(run.last_seq - run.first_seq + 1);
            }
        })?;
        if replies.len() != runs.runs.len() {
            return Err(protocol("append"));
        }
        let results: Vec<Appended> = replies
            .iter()
            .map(|v| match int(v) {
                Some(1) => Appended::Ok,
                Some(0) => Appended::Duplicate,
                Some(-1) => Appended::Fenced,
                Some(-3) => Appended::Gap,
                _ => Appended::Gone,
            })
            .collect();
        Ok(runs.entries.iter().map(|&(_, _, r)| results[r]).collect())
    }

    fn renew(&mut self, leases: &[Lease]) -> Result<Vec<Renewed>, StoreError> {
        let lease = self.ttls.lease.as_millis() as u64;
        let replies = self.run(|p, shas| {
            for l in leases {
                evalsha(p, shas, Script::Renew, &keys(&l.gen)[..1])
                    .arg(l.epoch)
                    .arg(lease);
            }
        })?;
        if replies.len() != leases.len() {
            return Err(protocol("renew"));
        }
        replies
            .iter()
            .map(|v| {
                let a = array(v)
                    .filter(|a| a.len() == 3)
                    .ok_or_else(|| protocol("renew"))?;
                Ok(Renewed {
                    fenced: int(&a[0]) != Some(0),
                    cancel: int(&a[1]) == Some(1),
                    watched: int(&a[2]) == Some(1),
                })
            })
            .collect()
    }

    fn release(&mut self, leases: &[Lease]) -> Result<(), StoreError> {
        self.run(|p, shas| {
            for l in leases {
                evalsha(p, shas, Script::Release, &keys(&l.gen)[..1])
                    .arg(l.epoch)
                    .ignore();
            }
        })
        .map(|_| ())
    }

    fn lookup(
        &mut self,
        session: &str,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Lookup, StoreError> {
        let gen = super::gen_id(session, id);
        let r = self.run(|p, shas| {
            p.cmd("GET").arg(format!("{{s:{session}}}"));
            evalsha(p, shas, Script::Lookup, &keys(&gen))
                .arg(after)
                .arg(limit.max(1));
        })?;
        let [sess, g] = &r[..] else {
            return Err(protocol("lookup"));
        };
        let session = bytes_of(sess).and_then(unhex);
        let gen = match g {
            Value::Nil => None,
            v => {
                let a = array(v)
                    .filter(|a| a.len() == 7)
                    .ok_or_else(|| protocol("lookup"))?;
                let n = |i: usize| int(&a[i]).unwrap_or(0);
                let mut msgs = Vec::new();
                for e in array(&a[6]).unwrap_or(&[]) {
                    let Some([_, fields]) = array(e).and_then(|e| <&[Value; 2]>::try_from(e).ok())
                    else {
                        return Err(protocol("lookup entry"));
                    };
                    let (first, packed) = entry_fields(fields).ok_or_else(|| protocol("entry"))?;
                    unpack(first, packed, &mut msgs).ok_or_else(|| protocol("packed entry"))?;
                }
                // Entries hold whole appends, so the first one kept by a trim or
                // by the `after` bound may start below either; drop those.
                let floor = after.max(n(2) as u64);
                msgs.retain(|(seq, _)| *seq > floor);
                msgs.truncate(limit);
                Some(Found {
                    msgs,
                    epoch: n(0) as u64,
                    last_seq: n(1) as u64,
                    trimmed: n(2) as u64,
                    done: n(3) == 1,
                    broken: n(4) == 1,
                    lease_expired: n(5) == 1,
                })
            }
        };
        Ok(Lookup { session, gen })
    }

    fn claim(&mut self, gen: &str, epoch: u64, owner: &str) -> Result<Claim, StoreError> {
        let lease = self.ttls.lease.as_millis() as u64;
        let [m, _, t] = keys(gen);
        let r = self.run(|p, shas| {
            evalsha(p, shas, Script::Claim, &[m, t])
                .arg(epoch)
                .arg(owner)
                .arg(lease);
        })?;
        let a = r.first().and_then(array).ok_or_else(|| protocol("claim"))?;
        match a.first().and_then(int) {
            Some(0) if a.len() == 5 => {
                let tokens = bytes_of(&a[3])
                    .unwrap_or(&[])
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Ok(Claim::Claimed(Claimed {
                    epoch: int(&a[1]).unwrap_or(0) as u64,
                    request: Bytes::copy_from_slice(bytes_of(&a[2]).unwrap_or(&[])),
                    tokens,
                    last_seq: int(&a[4]).unwrap_or(0) as u64,
                    log: None,
                }))
            }
            Some(1) => Ok(Claim::Busy),
            _ => Ok(Claim::Over),
        }
    }

    fn cancel(&mut self, gen: &str) -> Result<(), StoreError> {
        self.run(|p, shas| {
            evalsha(p, shas, Script::SetFlag, &keys(gen)[..1]).arg("cx");
        })
        .map(|_| ())
    }

    fn request(&mut self, gen: &str) -> Result<Option<Bytes>, StoreError> {
        let [m, _, _] = keys(gen);
        let r = self.run(|p, _| {
            p.cmd("HGET").arg(m).arg("rq");
        })?;
        Ok(r.first().and_then(bytes_of).map(Bytes::copy_from_slice))
    }

    fn delete(&mut self, gen: &str) -> Result<(), StoreError> {
        let k = keys(gen);
        self.run(|p, _| {
            p.cmd("DEL").arg(&k[..]).ignore();
        })
        .map(|_| ())
    }

    fn trim(&mut self, gen: &str, upto: u64) -> Result<(), StoreError> {
        self.run(|p, shas| {
            evalsha(p, shas, Script::Trim, &keys(gen)[..2]).arg(upto);
        })
        .map(|_| ())
    }

    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError> {
        self.run(|p, shas| {
            evalsha(p, shas, Script::SetFlag, &keys(gen)[..1]).arg("bad");
        })
        .map(|_| ())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.run(|p, _| {
            p.cmd("PING");
        })
        .map(|_| ())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
