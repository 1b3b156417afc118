//! The shared store: Redis (`--redis-url`) or Redis Cluster (`--redis-cluster`), one
//! synchronous RESP3 connection (or the `redis` crate's cluster connection: one per node) owned
//! by the state thread, every batch one pipeline (per node, on a cluster).
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
//! epoch inside a Lua function, so a fenced-off owner's late appends are refused. Leases run on
//! the Redis server's clock (`TIME`), so instances' clocks need not agree (on a cluster, each
//! generation's lease on the clock of the master that holds its slot).
//!
//! The Lua code is a Redis Function library (Redis 7+, `FUNCTION LOAD`), not `EVALSHA` scripts:
//! functions are persisted and replicated, so a replica promoted by a failover, or a restarted
//! server, already has them. The library and its functions are named after a hash of their
//! code, so instances running different versions during a rolling upgrade each call their own.
//!
//! On a cluster, a failing call (a master died and its replica is not promoted yet, MOVED after
//! a resharding, a dropped connection) is retried on a fresh connection, which reads the slot
//! map again, for up to `--redis-retry-ms` before the store counts as unavailable. Appends,
//! starts, renewals, releases and flags are idempotent (explicit stream ids, epoch checks), so
//! a retried pipeline whose first try partly ran leaves the same log. A claim is not: one that
//! succeeded but whose reply was lost finds the epoch moved on when retried and answers busy,
//! so that generation waits one more lease before a follower claims it again (never two
//! owners).

use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Cmd, Connection, ToRedisArgs, Value};

use super::{
    Appended, Batch, Claim, Claimed, Found, GenId, Lease, Lookup, RemoteUsage, Renewed, Start,
    StateStore, StoreError, TenantReport, Ttls,
};

/// Prefixed to the bodies that read the clock.
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

/// `KEYS[1]` the tenant's hash `{t:<tenant>}`: one field per instance, "streams conns requests
/// tokens time"; returns the other instances' fields (flat), dropping those older than
/// `ARGV[3]` ms.
const TENANT_SYNC: &str = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. now) \
    redis.call('PEXPIRE', KEYS[1], ARGV[4]) \
    local all = redis.call('HGETALL', KEYS[1]) local out = {} \
    for i = 1, #all, 2 do if all[i] ~= ARGV[1] then \
      local ts = tonumber(string.match(all[i + 1], '(%d+)$')) \
      if not ts or now - ts > tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], all[i]) \
      else out[#out + 1] = all[i] out[#out + 1] = all[i + 1] end end end \
    return out";

/// The function bodies (and whether each reads the clock), in [`Func`] order.
const FUNCS: [(&str, &str, bool); 9] = [
    ("start", START, true),
    ("append", APPEND, false),
    ("renew", RENEW, true),
    ("release", RELEASE, false),
    ("lookup", LOOKUP, true),
    ("claim", CLAIM, true),
    ("set_flag", SET_FLAG, false),
    ("trim", TRIM, false),
    ("tenant_sync", TENANT_SYNC, true),
];

#[derive(Clone, Copy)]
enum Func {
    Start,
    Append,
    Renew,
    Release,
    Lookup,
    Claim,
    SetFlag,
    Trim,
    TenantSync,
}

/// The function library: its source (for `FUNCTION LOAD REPLACE`) and the name of each
/// function, all suffixed with a hash of the code.
struct Library {
    source: String,
    names: Vec<String>,
}

impl Library {
    fn new() -> Self {
        // The whole generated source with a placeholder for the tag is what gets hashed, so
        // any change to a body, the clock prefix or the wrapper names a new library.
        const TAG: &str = "@TAG@";
        let mut template = format!("#!lua name=seedance_{TAG}\n");
        for (name, body, timed) in FUNCS {
            let now = if timed { NOW } else { "" };
            template.push_str(&format!(
                "redis.register_function('seedance_{TAG}_{name}', function(KEYS, ARGV) {now}{body} end)\n"
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, template.as_bytes());
        let tag = hex(&digest.as_ref()[..6]);
        Library {
            source: template.replace(TAG, &tag),
            names: FUNCS
                .iter()
                .map(|(name, _, _)| format!("seedance_{tag}_{name}"))
                .collect(),
        }
    }
}

/// The commands of one round trip, for either kind of connection.
#[derive(Default)]
struct Pipe {
    cmds: Vec<(Cmd, bool)>,
}

impl Pipe {
    fn cmd(&mut self, name: &str) -> &mut Self {
        self.cmds.push((redis::cmd(name), false));
        self
    }

    fn arg<T: ToRedisArgs>(&mut self, a: T) -> &mut Self {
        if let Some((c, _)) = self.cmds.last_mut() {
            c.arg(a);
        }
        self
    }

    /// The last command's reply is not returned.
    fn ignore(&mut self) -> &mut Self {
        if let Some((_, ignored)) = self.cmds.last_mut() {
            *ignored = true;
        }
        self
    }

    fn fcall(&mut self, lib: &Library, f: Func, keys: &[String]) -> &mut Self {
        self.cmd("FCALL")
            .arg(&lib.names[f as usize])
            .arg(keys.len());
        for k in keys {
            self.arg(k);
        }
        self
    }
}

/// A [`Pipe`] as the crate's pipeline for the connection at hand, built once per call and
/// resent as is on a retry.
enum Built {
    Single(redis::Pipeline),
    Cluster(redis::cluster::ClusterPipeline),
}

/// Where the store lives.
enum Link {
    Single {
        client: Box<redis::Client>,
        conn: Option<Box<Connection>>,
    },
    Cluster {
        client: Box<ClusterClient>,
        conn: Option<Box<ClusterConnection>>,
        /// How long a failing call is retried on fresh connections.
        retry_for: Duration,
    },
}

pub struct RedisStore {
    link: Link,
    lib: Library,
    ttls: Ttls,
    /// Failed attempts that were retried (cluster only), for the metrics.
    retries: u64,
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

/// `url` with `protocol=resp3` added unless it names a protocol.
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisStore {
    /// Connects to one Redis (and loads the functions); an unreachable server is an error here.
    pub fn connect(url: &str, ttls: Ttls) -> Result<Self, StoreError> {
        let client = redis::Client::open(resp3(url).as_str()).map_err(unavailable)?;
        Self::open(
            Link::Single {
                client: Box::new(client),
                conn: None,
            },
            ttls,
        )
    }

    /// Connects to a Redis Cluster through any of its `nodes` (URLs; the rest of the cluster
    /// is discovered from them) and loads the functions on every master. `retry_for`: how long
    /// a failing call is retried (a failover takes the cluster's `cluster-node-timeout` plus
    /// an election) before the store counts as unavailable.
    pub fn connect_cluster(
        nodes: &[String],
        ttls: Ttls,
        retry_for: Duration,
    ) -> Result<Self, StoreError> {
        if nodes.is_empty() {
            return Err(unavailable("no cluster nodes given"));
        }
        // The crate's own retries (16, with waits growing to seconds) would hold the state
        // thread past `retry_for` inside one attempt: one quick retry there (a MOVED or ASK
        // is followed at once), the waiting is done by `run`.
        let client = ClusterClient::builder(nodes.iter().map(|n| resp3(n)))
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(IO_TIMEOUT)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(unavailable)?;
        Self::open(
            Link::Cluster {
                client: Box::new(client),
                conn: None,
                retry_for,
            },
            ttls,
        )
    }

    fn open(link: Link, ttls: Ttls) -> Result<Self, StoreError> {
        let mut s = RedisStore {
            link,
            lib: Library::new(),
            ttls,
            retries: 0,
        };
        s.ensure().map_err(unavailable)?;
        Ok(s)
    }

    /// Opens the connection if there is none, loading the function library (on every master
    /// of a cluster: `FUNCTION LOAD` is routed to all of them).
    fn ensure(&mut self) -> redis::RedisResult<()> {
        let load = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.lib.source)
            .clone();
        match &mut self.link {
            Link::Single { client, conn } => {
                if conn.is_none() {
                    let mut c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                    c.set_read_timeout(Some(IO_TIMEOUT))?;
                    c.set_write_timeout(Some(IO_TIMEOUT))?;
                    load.query::<Value>(&mut c)?;
                    *conn = Some(Box::new(c));
                }
            }
            Link::Cluster { client, conn, .. } => {
                if conn.is_none() {
                    let mut c = client.get_connection()?;
                    load.query::<Value>(&mut c)?;
                    *conn = Some(Box::new(c));
                }
            }
        }
        Ok(())
    }

    /// One attempt of a built pipeline (one per node on a cluster).
    fn attempt(&mut self, q: &Built) -> redis::RedisResult<Vec<Value>> {
        self.ensure()?;
        let r = match (&mut self.link, q) {
            (
                Link::Single {
                    conn: Some(conn), ..
                },
                Built::Single(q),
            ) => q.query::<Vec<Value>>(conn),
            (
                Link::Cluster {
                    conn: Some(conn), ..
                },
                Built::Cluster(q),
            ) => q.query::<Vec<Value>>(conn),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "not connected",
            ))),
        };
        if r.is_err() {
            // The next attempt (or call) reconnects, which reads a cluster's slots again.
            self.disconnect();
        }
        r
    }

    fn disconnect(&mut self) {
        match &mut self.link {
            Link::Single { conn, .. } => *conn = None,
            Link::Cluster { conn, .. } => *conn = None,
        }
    }

    /// Runs the commands `build` adds as one round trip. A single Redis fails at once (the
    /// state thread backs off and pings); a cluster is retried for `retry_for`.
    fn run(&mut self, build: impl FnOnce(&mut Pipe, &Library)) -> Result<Vec<Value>, StoreError> {
        let mut p = Pipe::default();
        build(&mut p, &self.lib);
        if p.cmds.is_empty() {
            return Ok(Vec::new());
        }
        let (q, deadline) = match &self.link {
            Link::Single { .. } => {
                let mut q = redis::pipe();
                for (c, ignored) in p.cmds {
                    q.add_command(c);
                    if ignored {
                        q.ignore();
                    }
                }
                (Built::Single(q), None)
            }
            Link::Cluster { retry_for, .. } => {
                let mut q = redis::cluster::cluster_pipe();
                for (c, ignored) in p.cmds {
                    q.add_command(c);
                    if ignored {
                        q.ignore();
                    }
                }
                (Built::Cluster(q), Some(Instant::now() + *retry_for))
            }
        };
        let mut pause = Duration::from_millis(25);
        let mut reloaded = false;
        loop {
            let e = match self.attempt(&q) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !reloaded && e.to_string().contains("Function not found") {
                // A server that lost its functions (FUNCTION FLUSH, a new master without
                // persistence): the reconnect loads them again.
                reloaded = true;
                continue;
            }
            match deadline {
                Some(d) if Instant::now() + pause < d && retryable(&e) => {
                    self.retries += 1;
                    tracing::debug!("redis cluster call failed ({e}); retrying in {pause:?}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(400));
                }
                _ => return Err(unavailable(e)),
            }
        }
    }

    /// One command outside a pipeline (on a cluster, routed as the crate routes it: `PING`
    /// and `FLUSHDB` to every master).
    fn single(&mut self, c: &Cmd) -> Result<(), StoreError> {
        self.ensure().map_err(unavailable)?;
        let r = match &mut self.link {
            Link::Single {
                conn: Some(conn), ..
            } => c.query::<Value>(conn),
            Link::Cluster {
                conn: Some(conn), ..
            } => c.query::<Value>(conn),
            _ => return Err(unavailable("not connected")),
        };
        if let Err(e) = r {
            self.disconnect();
            return Err(unavailable(e));
        }
        Ok(())
    }

    /// Wipes every key this store wrote (test helper: the generation names under a session are
    /// not enumerable); on a cluster, on every master.
    pub fn flush_all(&mut self) -> Result<(), StoreError> {
        self.single(&redis::cmd("FLUSHDB"))
    }
}

/// Errors that a fresh connection or a promoted replica can cure; a reply the functions did not
/// expect (a bug, or a server without functions) is not retried.
fn retryable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    matches!(
        e.kind(),
        ErrorKind::Io
            | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                S::Moved
                    | S::Ask
                    | S::TryAgain
                    | S::ClusterDown
                    | S::MasterDown
                    | S::ReadOnly
                    | S::BusyLoading
            )
    ) || e.is_timeout()
        || e.is_connection_dropped()
}

impl StateStore for RedisStore {
    fn write(&mut self, starts: &[Start], batches: &[Batch]) -> Result<Vec<Appended>, StoreError> {
        let runs = group(batches);
        let (lease, ttl) = (
            self.ttls.lease.as_millis() as u64,
            self.ttls.log.as_millis() as u64,
        );
        let replies = self.run(|p, lib| {
            for s in starts {
                p.cmd("SET")
                    .arg(format!("{{s:{}}}", s.session))
                    .arg(hex(&s.token_hash))
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
                p.fcall(lib, Func::Start, &keys(&s.gen))
                    .arg(&*s.owner)
                    .arg(&s.request[..])
                    .arg(lease)
                    .arg(ttl)
                    .ignore();
            }
            let (mut msgs, mut toks) = (Vec::new(), Vec::new());
            for (r, run) in runs.runs.iter().enumerate() {
                runs.pack(batches, r, &mut msgs, &mut toks);
                p.fcall(lib, Func::Append, &keys(run.gen))
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
        let replies = self.run(|p, lib| {
            for l in leases {
                p.fcall(lib, Func::Renew, &keys(&l.gen)[..1])
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
        self.run(|p, lib| {
            for l in leases {
                p.fcall(lib, Func::Release, &keys(&l.gen)[..1])
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
        let r = self.run(|p, lib| {
            p.cmd("GET").arg(format!("{{s:{session}}}"));
            p.fcall(lib, Func::Lookup, &keys(&gen))
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
        let r = self.run(|p, lib| {
            p.fcall(lib, Func::Claim, &[m, t])
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
        self.run(|p, lib| {
            p.fcall(lib, Func::SetFlag, &keys(gen)[..1]).arg("cx");
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
        self.run(|p, lib| {
            p.fcall(lib, Func::Trim, &keys(gen)[..2]).arg(upto);
        })
        .map(|_| ())
    }

    fn mark_broken(&mut self, gen: &str) -> Result<(), StoreError> {
        self.run(|p, lib| {
            p.fcall(lib, Func::SetFlag, &keys(gen)[..1]).arg("bad");
        })
        .map(|_| ())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.single(&redis::cmd("PING"))
    }

    fn kind(&self) -> &'static str {
        match self.link {
            Link::Single { .. } => "redis",
            Link::Cluster { .. } => "redis-cluster",
        }
    }

    fn retries(&self) -> u64 {
        self.retries
    }

    fn tenant_sync(
        &mut self,
        instance: &str,
        reports: &[TenantReport],
        stale: Duration,
    ) -> Result<Vec<Vec<RemoteUsage>>, StoreError> {
        let stale_ms = stale.as_millis() as u64;
        let replies = self.run(|p, lib| {
            for r in reports {
                let usage = format!("{} {} {} {}", r.streams, r.conns, r.requests, r.tokens);
                p.fcall(lib, Func::TenantSync, &[format!("{{t:{}}}", r.tenant)])
                    .arg(instance)
                    .arg(usage)
                    .arg(stale_ms)
                    .arg(stale_ms.saturating_mul(20).max(60_000));
            }
        })?;
        if replies.len() != reports.len() {
            return Err(protocol("tenant_sync"));
        }
        Ok(replies
            .iter()
            .map(|v| {
                array(v)
                    .unwrap_or(&[])
                    .chunks_exact(2)
                    .filter_map(|kv| {
                        let instance = std::str::from_utf8(bytes_of(&kv[0])?).ok()?;
                        let usage = std::str::from_utf8(bytes_of(&kv[1])?).ok()?;
                        let n: Vec<u64> = usage
                            .split(' ')
                            .map(|x| x.parse().ok())
                            .collect::<Option<_>>()?;
                        let [streams, conns, requests, tokens, _at] = n[..] else {
                            return None;
                        };
                        Some(RemoteUsage {
                            instance: instance.to_owned(),
                            streams: streams as u32,
                            conns: conns as u32,
                            requests,
                            tokens,
                        })
                    })
                    .collect()
            })
            .collect())
    }
}
