//! The per-token path (sample → detokenize → stop-match) allocates nothing in steady state.
//! A counting global allocator, so this file is its own test binary with a single test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use seedance::engine::sampler::{Sampler, SamplingParams};
use seedance::model::detok::{DetokTable, Detokenizer};
use seedance::model::stop::StopMatcher;
use seedance::model::tokenizer::Tokenizer;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc` / `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn per_token_path_is_allocation_free() {
    for kind in ["llama3", "llama2"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/text")
            .join(kind);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let text = "Streaming 你好，世界！😀 tokens, 𝔘 and more text. ".repeat(8);
        let ids = tok.encode(&text, false).unwrap();
        let mut detok = Detokenizer::new(DetokTable::new(&tok));
        let mut stop = StopMatcher::new(&["</answer>".to_string(), "。。".to_string()]);
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            repetition_penalty: 1.1,
            frequency_penalty: 0.1,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&params, 4096);
        let base: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 97) as f32 * 0.05).collect();
        let mut logits = base.clone();
        let mut piece = String::with_capacity(256);
        let mut out = String::with_capacity(64 * 1024);
        let mut history: Vec<u32> = Vec::with_capacity(4096);
        let mut step = |i: usize, history: &mut Vec<u32>| {
            let id = ids[i % ids.len()];
            logits.copy_from_slice(&base);
            let _ = sampler.sample(&mut logits, history);
            history.push(id);
            piece.clear();
            detok.push(id, &mut piece);
            stop.push(&piece, &mut out);
        };
        // Warm-up: scratch buffers and strings reach their working sizes.
        for i in 0..ids.len() {
            step(i, &mut history);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for i in 0..ids.len() {
            step(i, &mut history);
        }
        let after = ALLOCS.load(Ordering::Relaxed);
        assert_eq!(
            after - before,
            0,
            "{kind}: {} allocations over {} tokens",
            after - before,
            ids.len()
        );
    }
}
