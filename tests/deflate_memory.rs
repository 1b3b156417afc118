//! What a permessage-deflate compressor really allocates, against what the compression budget
//! charges for it (`Deflater::memory_bytes`), for every window the server may use. A counting
//! global allocator sees zlib-rs' allocations (it allocates through Rust's allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use seedance::ws::deflate::{Deflater, Inflater};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn the_budget_charges_what_a_deflater_allocates() {
    let msg = br#"{"type":"delta","id":"c1","seq":7,"text":" hello"}"#;
    let mut out = Vec::with_capacity(4096);
    for bits in 9..=15u8 {
        let before = LIVE.load(Ordering::SeqCst);
        let mut d = Deflater::new(bits, false);
        assert!(d.compress(msg, &mut out));
        assert!(d.compress(msg, &mut out));
        let used = (LIVE.load(Ordering::SeqCst) - before) as usize;
        let charged = Deflater::memory_bytes(bits);
        // Charged at least what is used, and no more than 5% above it.
        assert!(
            charged >= used && charged * 100 <= used * 105,
            "window bits {bits}: allocated {used}, charged {charged}"
        );
        drop(d);
        assert_eq!(
            LIVE.load(Ordering::SeqCst),
            before,
            "window bits {bits}: freed"
        );
    }
    // One test function: the counter is process-wide and the harness runs tests in parallel.
    an_inflater_without_takeover_keeps_nothing_between_messages();
}

fn an_inflater_without_takeover_keeps_nothing_between_messages() {
    let mut d = Deflater::new(12, true);
    let mut z = Vec::with_capacity(4096);
    assert!(d.compress(b"{\"type\":\"ping\"}", &mut z));
    let mut inf = Inflater::new(false);
    let before = LIVE.load(Ordering::SeqCst);
    let msg = inf.inflate(&z, 1 << 20).unwrap();
    assert_eq!(&msg[..], b"{\"type\":\"ping\"}");
    drop(msg);
    assert_eq!(LIVE.load(Ordering::SeqCst), before);
}
