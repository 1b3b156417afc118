//! The `StateStore` contract, one body run against the embedded store and against Redis.
//!
//! Redis: `SEEDANCE_TEST_REDIS_URL` (scripts/test.sh starts a `redis-server` with AOF on a free
//! port and sets it). Without it the Redis half fails unless `SEEDANCE_TEST_SKIP_REDIS=1` says
//! to skip it, so that CI cannot pass by silently not testing Redis.

use std::time::Duration;

use bytes::Bytes;
use seedance::store::memory::MemoryStore;
use seedance::store::redis::RedisStore;
use seedance::store::{
    gen_id, token_hash, Appended, Batch, BatchBuilder, Claim, Found, Lease, Start, StateStore, Ttls,
};

const TTLS: Ttls = Ttls {
    log: Duration::from_millis(1500),
    lease: Duration::from_millis(300),
};

fn start(session: &str, id: &str) -> Start {
    Start {
        gen: gen_id(session, id),
        session: session.into(),
        token_hash: token_hash("secret"),
        owner: "test-a".into(),
        request: Bytes::from_static(br#"{"id":"x"}"#),
        log: None,
        ack: None,
    }
}

/// `delete`: the log and its request go; the owner's next append finds it gone, its
/// renewal is fenced.
fn deleted_generations_are_gone(store: &mut dyn StateStore) {
    let s = session(store.kind());
    let g = gen_id(&s, "del");
    store
        .write(&[start(&s, "del")], &[append(&g, 1, 1, 2, false)])
        .expect("write");
    store.delete(&g).expect("delete");
    assert!(store
        .lookup(&s, "del", 0, 10)
        .expect("lookup")
        .gen
        .is_none());
    assert_eq!(store.request(&g).expect("request"), None);
    let lease = Lease {
        gen: g.clone(),
        epoch: 1,
    };
    assert!(store.renew(&[lease]).expect("renew")[0].fenced);
    assert_ne!(
        store.write(&[], &[append(&g, 1, 3, 1, false)]).expect("w"),
        vec![Appended::Ok]
    );
}

fn msg(seq: u64) -> String {
    format!("{{\"seq\":{seq}}}")
}

/// A batch of one generation's messages `first..first + n` (message `s` covers token `10 s`).
fn append(gen: &str, epoch: u64, first: u64, n: u64, done: bool) -> Batch {
    let texts: Vec<String> = (first..first + n).map(msg).collect();
    let texts: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let tokens: Vec<[u32; 1]> = (first..first + n).map(|s| [s as u32 * 10]).collect();
    let tokens: Vec<&[u32]> = tokens.iter().map(|t| &t[..]).collect();
    Batch::of(&gen.into(), epoch, first, &texts, &tokens, done)
}

fn seqs(store: &mut dyn StateStore, session: &str, id: &str, after: u64) -> Vec<u64> {
    found(store, session, id, after)
        .msgs
        .iter()
        .map(|(s, m)| {
            assert_eq!(m, &Bytes::from(msg(*s)), "message body");
            *s
        })
        .collect()
}

/// The generation `id` of `session` as a resume after `after` finds it (it must be there).
fn found(store: &mut dyn StateStore, session: &str, id: &str, after: u64) -> Found {
    let l = store.lookup(session, id, after, 1000).expect("lookup");
    l.gen.expect("generation present")
}

/// A session name unique to this run (Redis keeps data across runs).
fn session(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("s-test-{tag}-{t:x}")
}

fn contract(store: &mut dyn StateStore) {
    deleted_generations_are_gone(store);
    let s = session(store.kind());
    let g = gen_id(&s, "r1");
    let w = store
        .write(&[start(&s, "r1")], &[append(&g, 1, 1, 3, false)])
        .expect("write");
    assert_eq!(w, vec![Appended::Ok]);

    // Append order, replay after an offset (exclusive), the token hash.
    assert_eq!(
        store.write(&[], &[append(&g, 1, 4, 2, false)]).expect("w"),
        vec![Appended::Ok]
    );
    assert_eq!(seqs(store, &s, "r1", 0), vec![1, 2, 3, 4, 5]);
    assert_eq!(seqs(store, &s, "r1", 3), vec![4, 5]);
    let l = store.lookup(&s, "r1", 0, 2).expect("lookup");
    assert_eq!(l.session, Some(token_hash("secret")));
    let first = l.gen.expect("gen");
    assert_eq!(first.msgs.len(), 2, "limit respected");
    assert_eq!(
        (first.last_seq, first.done, first.broken),
        (5, false, false)
    );
    assert!(!first.lease_expired);
    // The request blob comes back as stored (HTTP views render from it).
    assert_eq!(
        store.request(&g).expect("request").as_deref(),
        Some(&br#"{"id":"x"}"#[..])
    );
    assert_eq!(store.request("nope/r1").expect("request"), None);

    // Idempotent re-append: a retried batch changes nothing.
    assert_eq!(
        store.write(&[], &[append(&g, 1, 4, 2, false)]).expect("w"),
        vec![Appended::Duplicate]
    );
    assert_eq!(seqs(store, &s, "r1", 0), vec![1, 2, 3, 4, 5]);

    // Unknown session and unknown id are told apart.
    let none = store.lookup("s-nobody", "r1", 0, 10).expect("lookup");
    assert!(none.session.is_none() && none.gen.is_none());
    let no_id = store.lookup(&s, "nope", 0, 10).expect("lookup");
    assert!(no_id.session.is_some() && no_id.gen.is_none());

    // Renewal answers; a cancel request reaches the owner through it.
    let lease = Lease {
        gen: g.clone(),
        epoch: 1,
    };
    let r = store.renew(std::slice::from_ref(&lease)).expect("renew");
    assert!(!r[0].fenced && !r[0].cancel);
    assert!(r[0].watched, "a lookup within the lease marks it watched");
    store.cancel(&g).expect("cancel");
    assert!(store.renew(std::slice::from_ref(&lease)).expect("renew")[0].cancel);

    // A live lease cannot be claimed; an expired one can, once (epoch CAS).
    assert!(matches!(
        store.claim(&g, 1, "test-b").expect("claim"),
        Claim::Busy
    ));
    std::thread::sleep(TTLS.lease + Duration::from_millis(100));
    assert!(found(store, &s, "r1", 5).lease_expired);
    let Claim::Claimed(c) = store.claim(&g, 1, "test-b").expect("claim") else {
        panic!("expired lease not claimable");
    };
    assert_eq!((c.epoch, c.last_seq), (2, 5));
    assert_eq!(c.tokens, vec![10, 20, 30, 40, 50]);
    assert_eq!(c.request, Bytes::from_static(br#"{"id":"x"}"#));
    assert!(matches!(
        store.claim(&g, 1, "test-c").expect("claim"),
        Claim::Busy
    ));

    // Fencing: the old owner's appends and renewals are refused; the new owner's go on.
    assert_eq!(
        store.write(&[], &[append(&g, 1, 6, 1, false)]).expect("w"),
        vec![Appended::Fenced]
    );
    assert!(store.renew(&[lease]).expect("renew")[0].fenced);
    assert_eq!(
        store.write(&[], &[append(&g, 2, 6, 2, true)]).expect("w"),
        vec![Appended::Ok]
    );
    assert_eq!(seqs(store, &s, "r1", 5), vec![6, 7]);
    let f = found(store, &s, "r1", 7);
    assert!(f.done && !f.lease_expired);
    assert!(matches!(
        store.claim(&g, 2, "test-c").expect("c"),
        Claim::Over
    ));

    // A gap closes the log as not resumable.
    let g2 = gen_id(&s, "r2");
    store.write(&[start(&s, "r2")], &[]).expect("start");
    assert_eq!(
        store.write(&[], &[append(&g2, 1, 3, 1, false)]).expect("w"),
        vec![Appended::Gap]
    );
    assert!(found(store, &s, "r2", 0).broken);

    // Trim: acknowledged messages go; the rest stay.
    store.trim(&g, 6).expect("trim");
    assert_eq!(seqs(store, &s, "r1", 0), vec![7]);
    assert_eq!(found(store, &s, "r1", 0).trimmed, 6);

    // A released lease is claimable at once.
    let g3 = gen_id(&s, "r3");
    store
        .write(&[start(&s, "r3")], &[append(&g3, 1, 1, 1, false)])
        .expect("w");
    store
        .release(&[Lease {
            gen: g3.clone(),
            epoch: 1,
        }])
        .expect("release");
    assert!(matches!(
        store.claim(&g3, 1, "b").expect("c"),
        Claim::Claimed(_)
    ));

    // Batches as shards build them: two generations interleaved in one batch, and one
    // generation going on in the next batch of the same write (Redis makes them one entry).
    let (g4, g5) = (gen_id(&s, "r4"), gen_id(&s, "r5"));
    store
        .write(&[start(&s, "r4"), start(&s, "r5")], &[])
        .expect("start");
    let mut b = BatchBuilder::default();
    let e4 = b.open(&g4, 1, 1);
    let e5 = b.open(&g5, 1, 1);
    for seq in 1..=3u64 {
        b.push(e4, &[], msg(seq).as_bytes(), &[seq as u32], false);
        b.push(e5, &[], msg(seq).as_bytes(), &[100 + seq as u32], false);
    }
    let first = b.take(None);
    let e4 = b.open(&g4, 1, 4);
    b.push(e4, &[], msg(4).as_bytes(), &[4], true);
    let second = b.take(None);
    assert_eq!(
        store.write(&[], &[first, second]).expect("w"),
        vec![Appended::Ok, Appended::Ok, Appended::Ok]
    );
    assert_eq!(seqs(store, &s, "r4", 0), vec![1, 2, 3, 4]);
    assert_eq!(seqs(store, &s, "r5", 1), vec![2, 3]);
    assert!(found(store, &s, "r4", 0).done);
    std::thread::sleep(TTLS.lease + Duration::from_millis(100));
    let Claim::Claimed(c) = store.claim(&g5, 1, "test-b").expect("claim") else {
        panic!("r5 not claimable");
    };
    assert_eq!((c.last_seq, c.tokens), (3, vec![101, 102, 103]));

    // TTL: a log expires after its last write.
    std::thread::sleep(TTLS.log + Duration::from_millis(1200));
    let gone = store.lookup(&s, "r1", 0, 10).expect("lookup");
    assert!(gone.gen.is_none(), "expired log still there");
    assert!(gone.session.is_none(), "expired session still there");
    assert_eq!(
        store.write(&[], &[append(&g, 2, 8, 1, false)]).expect("w"),
        vec![Appended::Gone]
    );
}

#[test]
fn memory_store_contract() {
    contract(&mut MemoryStore::new(TTLS, 64 << 20));
}

#[test]
fn memory_store_frees_what_is_acknowledged() {
    let mut m = MemoryStore::new(TTLS, 64 << 20);
    let s = session("ack");
    let (ga, gb) = (gen_id(&s, "a"), gen_id(&s, "b"));
    m.write(&[start(&s, "a"), start(&s, "b")], &[])
        .expect("start");
    let base = m.bytes();
    let mut b = BatchBuilder::default();
    let (ea, eb) = (b.open(&ga, 1, 1), b.open(&gb, 1, 1));
    b.push(ea, &[], &[b'a'; 10_000], &[7], false);
    b.push(eb, &[], &[b'b'; 10_000], &[8], false);
    m.write(&[], &[b.take(None)]).expect("write");
    let both = m.bytes();
    assert!(both >= base + 19_000, "{both} bytes held, {base} before");
    m.trim(&ga, 1).expect("trim");
    let held = m.bytes();
    assert!(
        held + 9_000 <= both && held >= base + 9_000,
        "{both} bytes held, then {held} with only b's message left"
    );
    let left = found(&mut m, &s, "b", 0).msgs;
    assert_eq!(left, vec![(1, Bytes::from(vec![b'b'; 10_000]))]);
    m.trim(&gb, 1).expect("trim");
    assert!(
        m.bytes() < base + 1_000,
        "{} bytes held after both acks",
        m.bytes()
    );
    // A trimmed message's tokens stay: a takeover re-prefills them.
    std::thread::sleep(TTLS.lease + Duration::from_millis(100));
    let Claim::Claimed(c) = m.claim(&ga, 1, "b").expect("claim") else {
        panic!("not claimable");
    };
    assert_eq!((c.tokens, c.last_seq), (vec![7], 1));
}

#[test]
fn memory_store_evicts_over_its_cap() {
    let mut m = MemoryStore::new(TTLS, 64 * 1024);
    let s = session("cap");
    for i in 0..100 {
        let id = format!("r{i}");
        let g = gen_id(&s, &id);
        let a = Batch::of(&g, 1, 1, &[&[b'x'; 4096]], &[&[1]], true);
        m.write(&[start(&s, &id)], &[a]).expect("write");
    }
    assert!(m.bytes() <= 64 * 1024, "{} bytes held", m.bytes());
    assert!(
        m.lookup(&s, "r99", 0, 1).expect("l").gen.is_some(),
        "newest kept"
    );
    assert!(
        m.lookup(&s, "r0", 0, 1).expect("l").gen.is_none(),
        "oldest evicted"
    );
}

#[test]
fn redis_store_contract() {
    let Ok(url) = std::env::var("SEEDANCE_TEST_REDIS_URL") else {
        assert!(
            std::env::var("SEEDANCE_TEST_SKIP_REDIS").is_ok(),
            "set SEEDANCE_TEST_REDIS_URL (scripts/test.sh does) or SEEDANCE_TEST_SKIP_REDIS=1"
        );
        eprintln!("skipped: SEEDANCE_TEST_SKIP_REDIS is set");
        return;
    };
    let mut r = RedisStore::connect(&url, TTLS).expect("connect to the test redis");
    contract(&mut r);
}

#[test]
fn redis_unreachable_is_an_error() {
    let e = RedisStore::connect("redis://127.0.0.1:1", TTLS);
    assert!(e.is_err());
}

/// The same contract on a Redis Cluster (`SEEDANCE_TEST_REDIS_CLUSTER`: comma-separated node
/// URLs; the scale-out stage of scripts/test.sh starts a 3-master cluster and sets it), where
/// every generation's keys live in one slot and a lookup's session key in another.
#[test]
fn redis_cluster_store_contract() {
    let Ok(nodes) = std::env::var("SEEDANCE_TEST_REDIS_CLUSTER") else {
        eprintln!("skipped: SEEDANCE_TEST_REDIS_CLUSTER is not set (the scaleout stage sets it)");
        return;
    };
    let nodes: Vec<String> = nodes.split(',').map(str::to_owned).collect();
    let mut r = RedisStore::connect_cluster(&nodes, TTLS, Duration::from_secs(5))
        .expect("connect to the test cluster");
    assert_eq!(r.kind(), "redis-cluster");
    contract(&mut r);
}
