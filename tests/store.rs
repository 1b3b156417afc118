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
    gen_id, token_hash, Append, Appended, Claim, Lease, Start, StateStore, Ttls,
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
    }
}

fn append(gen: &str, epoch: u64, first: u64, n: u64, done: bool) -> Append {
    Append {
        gen: gen.into(),
        epoch,
        first_seq: first,
        msgs: (first..first + n)
            .map(|s| Bytes::from(format!("{{\"seq\":{s}}}")))
            .collect(),
        tokens: (first..first + n).map(|s| s as u32 * 10).collect(),
        done,
    }
}

fn seqs(store: &mut dyn StateStore, session: &str, id: &str, after: u64) -> Vec<u64> {
    let l = store.lookup(session, id, after, 1000).expect("lookup");
    l.gen
        .expect("generation present")
        .msgs
        .iter()
        .map(|(s, m)| {
            assert_eq!(m, &Bytes::from(format!("{{\"seq\":{s}}}")), "message body");
            *s
        })
        .collect()
}

/// A session name unique to this run (Redis keeps data across runs).
fn session(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("s-test-{tag}-{t:x}")
}

fn contract(store: &mut dyn StateStore) {
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
    let found = l.gen.expect("gen");
    assert_eq!(found.msgs.len(), 2, "limit respected");
    assert_eq!(
        (found.last_seq, found.done, found.broken),
        (5, false, false)
    );
    assert!(!found.lease_expired);

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
    assert!(
        store
            .lookup(&s, "r1", 5, 10)
            .expect("l")
            .gen
            .expect("g")
            .lease_expired
    );
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
    let f = store.lookup(&s, "r1", 7, 10).expect("l").gen.expect("g");
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
    assert!(
        store
            .lookup(&s, "r2", 0, 10)
            .expect("l")
            .gen
            .expect("g")
            .broken
    );

    // Trim: acknowledged messages go; the rest stay.
    store.trim(&g, 6).expect("trim");
    assert_eq!(seqs(store, &s, "r1", 0), vec![7]);
    assert_eq!(
        store
            .lookup(&s, "r1", 0, 10)
            .expect("l")
            .gen
            .expect("g")
            .trimmed,
        6
    );

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
fn memory_store_evicts_over_its_cap() {
    let mut m = MemoryStore::new(TTLS, 64 * 1024);
    let s = session("cap");
    for i in 0..100 {
        let id = format!("r{i}");
        let g = gen_id(&s, &id);
        let mut a = append(&g, 1, 1, 1, true);
        a.msgs = vec![Bytes::from(vec![b'x'; 4096])];
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
