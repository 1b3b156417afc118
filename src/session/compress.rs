//! Compression of WebSocket messages (SPEC 4 "Compression"): zstd, one stream per connection,
//! flushed at every message so each binary frame decodes on its own while the context carries
//! over; and permessage-deflate ([`DeflateStream`], RFC 7692) for browsers and other clients
//! that offer it. Both share the memory budget and the rules below.
//!
//! Memory is bounded three ways. Every context is made with small window, hash and chain logs
//! (`zstd_window_log`; a default context is megabytes). A connection holds a context only while
//! it has generations in flight: the message that leaves it idle ends the zstd frame and the
//! context is freed, so an idle compressed connection costs no more than a plain one. And all
//! contexts of the process together stay under `compression_budget_mb`: past it a connection
//! sends plain text frames until memory is free again, and new connections are not granted zstd.
//!
//! The level follows the shard's CPU load (9 light, 3 middle, 1 heavy; [`level_for_load`]); a
//! level change ends the current zstd frame at a message boundary and starts the next one at the
//! new level, and past the breaker load messages go out as plain text frames, the stream left as
//! it was. A decoder therefore reads binary frames as one zstd stream that may hold several
//! frames, and text frames as plain JSON.

use std::sync::atomic::{AtomicUsize, Ordering};

use zstd_safe::zstd_sys::ZSTD_EndDirective;
use zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer};

use crate::config::CompressionConfig;
use crate::ws::deflate::{DeflateParams, Deflater};

/// The process-wide budget of compression context memory (zstd and deflate).
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    count: AtomicUsize,
    /// What one zstd context takes once it has compressed (measured at start-up).
    pub ctx_bytes: usize,
    pub window_log: u32,
    /// What one deflater with the configured window takes.
    pub deflate_bytes: usize,
}

impl Budget {
    pub fn new(cfg: &CompressionConfig) -> Self {
        Self {
            limit: if cfg.enabled { cfg.budget_bytes } else { 0 },
            used: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            ctx_bytes: measure_ctx_bytes(cfg.window_log),
            window_log: cfg.window_log,
            deflate_bytes: Deflater::memory_bytes(cfg.deflate_window_bits),
        }
    }

    /// Whether a new connection may be granted zstd now.
    pub fn has_room(&self) -> bool {
        self.has_room_for(self.ctx_bytes)
    }

    /// Whether a context of `bytes` fits now.
    pub fn has_room_for(&self, bytes: usize) -> bool {
        self.used.load(Ordering::Relaxed) + bytes <= self.limit
    }

    fn try_charge(&self, bytes: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.count.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// A pooled context taken by a connection (its bytes stay charged throughout).
    fn in_use(&self, delta: isize) {
        if delta > 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
        } else {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A pooled context freed (it was not in use).
    fn free_pooled(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Contexts connections use now (pooled ones not counted).
    pub fn contexts(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn used_bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A shard's free compression contexts. Connections give theirs back when they go idle and take
/// one when they start again, so a burst does not pay for creating one (zstd's `createCCtx`
/// and the kernel zeroing fresh pages were 14% of a shard streaming 1,000 zstd connections).
/// Pooled contexts stay charged to the budget; the pool keeps only as many as were taken during
/// the last sample interval (100 ms), so it drains when connections stay idle.
#[derive(Default)]
pub struct Pools {
    zstd: std::cell::RefCell<Vec<CCtx<'static>>>,
    deflate: std::cell::RefCell<Vec<(u8, Deflater)>>,
    taken: std::cell::Cell<(usize, usize)>,
}

impl Pools {
    /// Frees what was not needed since the last call (the shard's load sample).
    pub fn trim(&self, budget: &Budget) {
        let (z, d) = self.taken.replace((0, 0));
        let mut zs = self.zstd.borrow_mut();
        while zs.len() > z {
            zs.pop();
            budget.free_pooled(budget.ctx_bytes);
        }
        let mut ds = self.deflate.borrow_mut();
        while ds.len() > d {
            if let Some((bits, _)) = ds.pop() {
                budget.free_pooled(Deflater::memory_bytes(bits));
            }
        }
    }

    /// Frees every pooled context (shard shutdown).
    pub fn clear(&self, budget: &Budget) {
        self.taken.set((0, 0));
        self.trim(budget);
    }

    pub fn len(&self) -> usize {
        self.zstd.borrow().len() + self.deflate.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take_zstd(&self) -> Option<CCtx<'static>> {
        let c = self.zstd.borrow_mut().pop()?;
        let (z, d) = self.taken.get();
        self.taken.set((z + 1, d));
        Some(c)
    }

    fn take_deflate(&self, bits: u8) -> Option<Deflater> {
        let mut ds = self.deflate.borrow_mut();
        let i = ds.iter().rposition(|(b, _)| *b == bits)?;
        let (_, d) = ds.swap_remove(i);
        let (zt, dt) = self.taken.get();
        self.taken.set((zt, dt + 1));
        Some(d)
    }
}

/// Most contexts of each codec a shard keeps free.
const POOL_MAX: usize = 256;

/// The level for a shard CPU load in 0..=1 (`None`: the breaker is open, send plain).
pub fn level_for_load(cfg: &CompressionConfig, load: f64) -> Option<i32> {
    if load >= cfg.load_breaker {
        None
    } else if load >= cfg.load_heavy {
        Some(1)
    } else if load >= cfg.load_light {
        Some(3)
    } else {
        Some(9)
    }
}

/// A context with the capped parameters.
fn new_ctx(window_log: u32, level: i32) -> Option<CCtx<'static>> {
    let mut c = CCtx::try_create()?;
    let params = [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(window_log),
        CParameter::HashLog(window_log),
        CParameter::ChainLog(window_log),
        CParameter::ContentSizeFlag(false),
        CParameter::ChecksumFlag(false),
    ];
    for p in params {
        c.set_parameter(p).ok()?;
    }
    Some(c)
}

/// `ZSTD_sizeof_CCtx` of a context that compressed a message at the highest level we use.
fn measure_ctx_bytes(window_log: u32) -> usize {
    let Some(mut c) = new_ctx(window_log, 9) else {
        return 1 << 20;
    };
    let mut out = Vec::with_capacity(4096);
    let msg = br#"{"type":"delta","id":"c1","seq":1,"text":" hello"}"#;
    let _ = c.compress_stream2(
        &mut OutBuffer::around(&mut out),
        &mut InBuffer::around(msg),
        ZSTD_EndDirective::ZSTD_e_flush,
    );
    c.sizeof()
}

/// A connection's zstd stream.
#[derive(Default)]
pub struct ZstdStream {
    ctx: Option<CCtx<'static>>,
    level: i32,
    /// A zstd frame is open (the decoder is inside it).
    open: bool,
    /// A compression call failed: this connection sends plain from now on.
    broken: bool,
}

impl ZstdStream {
    /// Compresses one message into `out` (cleared first). `end`: no generation is left in
    /// flight, so the frame ends and the context is freed. `false`: send this one plain.
    pub fn compress(
        &mut self,
        (budget, pools): (&Budget, &Pools),
        level: i32,
        msg: &[u8],
        end: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        out.clear();
        if self.broken {
            return false;
        }
        if self.ctx.is_none() {
            if let Some(mut c) = pools.take_zstd() {
                budget.in_use(1);
                if c.set_parameter(CParameter::CompressionLevel(level))
                    .is_err()
                {
                    self.ctx = Some(c);
                    self.broken = true;
                    self.drop_ctx(budget, pools);
                    return false;
                }
                self.ctx = Some(c);
            } else {
                if !budget.try_charge(budget.ctx_bytes) {
                    return false;
                }
                match new_ctx(budget.window_log, level) {
                    Some(c) => self.ctx = Some(c),
                    None => {
                        budget.release(budget.ctx_bytes);
                        return false;
                    }
                }
            }
            self.level = level;
        }
        let ok = self.compress_inner(level, msg, end, out);
        if !ok {
            // The decoder may hold part of a frame: never send it zstd again.
            self.broken = true;
            out.clear();
        }
        if end || !ok {
            self.drop_ctx(budget, pools);
        }
        ok
    }

    fn compress_inner(&mut self, level: i32, msg: &[u8], end: bool, out: &mut Vec<u8>) -> bool {
        let Some(ctx) = self.ctx.as_mut() else {
            return false;
        };
        if level != self.level {
            if self.open {
                // Parameters apply from the next frame: end this one here.
                if !run(ctx, &[], ZSTD_EndDirective::ZSTD_e_end, out) {
                    return false;
                }
                self.open = false;
            }
            if ctx
                .set_parameter(CParameter::CompressionLevel(level))
                .is_err()
            {
                return false;
            }
            self.level = level;
        }
        let op = if end {
            ZSTD_EndDirective::ZSTD_e_end
        } else {
            ZSTD_EndDirective::ZSTD_e_flush
        };
        if !run(ctx, msg, op, out) {
            return false;
        }
        self.open = !end;
        true
    }

    /// Gives the context back (the connection closed, or went idle with its frame ended): to the
    /// shard's pool, reset, or freed when the pool is full or the context failed.
    pub fn drop_ctx(&mut self, budget: &Budget, pools: &Pools) {
        if let Some(mut c) = self.ctx.take() {
            let reusable = !self.broken
                && c.reset(zstd_safe::ResetDirective::SessionOnly).is_ok()
                && pools.zstd.borrow().len() < POOL_MAX;
            if reusable {
                pools.zstd.borrow_mut().push(c);
                budget.in_use(-1);
            } else {
                budget.release(budget.ctx_bytes);
            }
        }
        self.open = false;
    }
}

/// A connection's permessage-deflate compressor. Like a zstd stream it holds a deflater only
/// while generations are in flight: the message that leaves the connection idle frees it, and
/// the next message starts a fresh one. That is valid with context takeover too: the client's
/// inflater keeps its window, a fresh deflater just never refers back into it.
pub struct DeflateStream {
    d: Option<Deflater>,
    window_bits: u8,
    no_takeover: bool,
    /// zlib failed once: this connection sends uncompressed messages from now on.
    broken: bool,
}

impl DeflateStream {
    pub fn new(p: &DeflateParams) -> Self {
        Self {
            d: None,
            window_bits: p.server_window_bits,
            no_takeover: p.server_no_context_takeover,
            broken: false,
        }
    }

    fn bytes(&self) -> usize {
        Deflater::memory_bytes(self.window_bits)
    }

    /// Compresses one message into `out` (the payload of an RSV1 frame). `end`: no generation
    /// is left in flight, the deflater is freed after it. `false`: send this one uncompressed
    /// (budget spent or zlib failed).
    pub fn compress(
        &mut self,
        (budget, pools): (&Budget, &Pools),
        msg: &[u8],
        end: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        out.clear();
        if self.broken {
            return false;
        }
        if self.d.is_none() {
            if let Some(mut d) = pools.take_deflate(self.window_bits) {
                budget.in_use(1);
                d.set_no_takeover(self.no_takeover);
                self.d = Some(d);
            } else {
                if !budget.try_charge(self.bytes()) {
                    return false;
                }
                self.d = Some(Deflater::new(self.window_bits, self.no_takeover));
            }
        }
        let ok = self.d.as_mut().is_some_and(|d| d.compress(msg, out));
        if !ok {
            self.broken = true;
            out.clear();
        }
        if end || !ok {
            self.drop_ctx(budget, pools);
        }
        ok
    }

    /// Gives the deflater back: reset into the shard's pool, or freed.
    pub fn drop_ctx(&mut self, budget: &Budget, pools: &Pools) {
        if let Some(mut d) = self.d.take() {
            if !self.broken && pools.deflate.borrow().len() < POOL_MAX {
                d.reset();
                pools.deflate.borrow_mut().push((self.window_bits, d));
                budget.in_use(-1);
            } else {
                budget.release(self.bytes());
            }
        }
    }
}

/// Feeds `msg` with `op` until zstd has written everything out, appending to `out`.
fn run(ctx: &mut CCtx<'static>, msg: &[u8], op: ZSTD_EndDirective, out: &mut Vec<u8>) -> bool {
    let mut input = InBuffer::around(msg);
    loop {
        out.reserve(msg.len() / 2 + 64);
        let pos = out.len();
        let mut ob = OutBuffer::around_pos(out, pos);
        let remaining = match ctx.compress_stream2(&mut ob, &mut input, op) {
            Ok(r) => r,
            Err(_) => return false,
        };
        if remaining == 0 && input.pos() == msg.len() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zstd_safe::DCtx;

    fn cfg() -> CompressionConfig {
        CompressionConfig {
            enabled: true,
            deflate: true,
            budget_bytes: 64 << 20,
            window_log: 12,
            deflate_window_bits: 12,
            load_light: 0.5,
            load_heavy: 0.8,
            load_breaker: 0.95,
        }
    }

    /// A streaming decoder fed one message at a time, across frames.
    struct Decoder {
        d: DCtx<'static>,
    }

    impl Decoder {
        fn feed(&mut self, msg: &[u8]) -> Vec<u8> {
            let mut out = Vec::with_capacity(1 << 16);
            let mut input = InBuffer::around(msg);
            while input.pos() < msg.len() {
                let pos = out.len();
                let mut ob = OutBuffer::around_pos(&mut out, pos);
                self.d.decompress_stream(&mut ob, &mut input).unwrap();
            }
            out
        }
    }

    #[test]
    fn each_message_decodes_on_its_own_across_level_changes_and_idle() {
        let cfg = cfg();
        let budget = Budget::new(&cfg);
        let pools = Pools::default();
        assert!(budget.ctx_bytes < 512 << 10, "{}", budget.ctx_bytes);
        let mut z = ZstdStream::default();
        let mut dec = Decoder { d: DCtx::create() };
        let (mut plain, mut wire) = (0, 0);
        let mut buf = Vec::new();
        for i in 0..300u32 {
            let msg = format!(
                r#"{{"type":"delta","id":"c1","seq":{i},"text":" word{}"}}"#,
                i % 7
            );
            let level = [9, 3, 1][(i / 50) as usize % 3];
            let end = i % 100 == 99;
            assert!(z.compress((&budget, &pools), level, msg.as_bytes(), end, &mut buf));
            assert_eq!(dec.feed(&buf), msg.as_bytes(), "message {i}");
            plain += msg.len();
            wire += buf.len();
            assert_eq!(budget.contexts(), usize::from(!end));
            // One context in all: made once, then back and forth through the pool.
            assert_eq!(budget.used_bytes(), budget.ctx_bytes);
            assert_eq!(pools.len(), usize::from(end));
        }
        assert!(wire * 2 < plain, "{wire} of {plain}");
        // The pool keeps what was taken since the last trim, then drains.
        pools.trim(&budget);
        assert_eq!(pools.len(), 1);
        pools.trim(&budget);
        assert_eq!((pools.len(), budget.used_bytes()), (0, 0));
    }

    #[test]
    fn budget_refuses_past_its_limit() {
        let mut c = cfg();
        c.budget_bytes = 0;
        let budget = Budget::new(&c);
        assert!(!budget.has_room());
        let mut z = ZstdStream::default();
        let mut buf = Vec::new();
        assert!(!z.compress((&budget, &Pools::default()), 3, b"{}", false, &mut buf));
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn deflate_holds_its_deflater_only_while_busy_and_within_the_budget() {
        let budget = Budget::new(&cfg());
        let p = DeflateParams {
            server_window_bits: 10,
            server_no_context_takeover: false,
            client_no_context_takeover: true,
            client_max_window_bits: None,
            echo_server_bits: false,
        };
        let pools = Pools::default();
        let mut d = DeflateStream::new(&p);
        let mut inf = crate::ws::deflate::Inflater::new(true);
        let mut out = Vec::new();
        for i in 0..200u32 {
            let msg = format!(
                r#"{{"type":"delta","id":"c1","seq":{i},"text":" w{}"}}"#,
                i % 5
            );
            let end = i % 50 == 49;
            assert!(d.compress((&budget, &pools), msg.as_bytes(), end, &mut out));
            assert_eq!(&inf.inflate(&out, 1 << 16).unwrap()[..], msg.as_bytes());
            assert_eq!(budget.contexts(), usize::from(!end));
            // Made once, pooled while idle, reused: the inflater never notices.
            assert_eq!(budget.used_bytes(), Deflater::memory_bytes(10));
            assert_eq!(pools.len(), usize::from(end));
        }
        pools.clear(&budget);
        assert_eq!(budget.used_bytes(), 0);
        let mut c = cfg();
        c.budget_bytes = Deflater::memory_bytes(10) - 1;
        let small = Budget::new(&c);
        assert!(!DeflateStream::new(&p).compress((&small, &pools), b"{}", false, &mut out));
        assert_eq!(small.contexts(), 0);
    }

    #[test]
    fn levels_follow_load() {
        let c = cfg();
        let l = |x| level_for_load(&c, x);
        assert_eq!(
            (l(0.1), l(0.6), l(0.9), l(0.99)),
            (Some(9), Some(3), Some(1), None)
        );
    }
}
