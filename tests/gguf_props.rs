//! The GGUF reader on malformed files: random truncations, byte flips and absurd values written
//! over the header, counts, lengths, dimensions, types and offsets of a valid file. Each must
//! parse or be refused with an error — never a panic — and parsing must never allocate much
//! more than the file itself (a length field of 2^63 must not become an allocation). A
//! tracking global allocator records the largest single allocation made while parsing, so this
//! file is its own test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use seedance::model::gguf::write::{file, Tensor};
use seedance::model::gguf::{dequantize, Gguf, Value};

struct Tracking;

thread_local! {
    /// Set on the thread that parses (tests run on several threads at once).
    static ON: Cell<bool> = const { Cell::new(false) };
}
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn tracking() -> bool {
    ON.try_with(Cell::get).unwrap_or(false)
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracking() {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` here with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if tracking() {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc` / `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// A valid file with every value kind, nested arrays, and tensors of several types.
fn valid() -> Vec<u8> {
    let f16: Vec<u8> = (0..64u16)
        .flat_map(|i| half::f16::from_f32(i as f32 / 8.0).to_le_bytes())
        .collect();
    let q4_1: Vec<u8> = (0..40u8).collect();
    let q8_0: Vec<u8> = (0..68u8).collect();
    file(
        &[
            ("general.architecture", Value::Str("llama".into())),
            ("general.alignment", Value::U32(32)),
            ("llama.block_count", Value::U32(1)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("x.i64", Value::I64(-3)),
            ("x.f64", Value::F64(0.25)),
            ("x.bool", Value::Bool(true)),
            (
                "tokenizer.ggml.tokens",
                Value::Strs((0..20).map(|i| format!("t{i}")).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Scalars {
                    elem: 5,
                    data: (0..20i32).flat_map(|i| i.to_le_bytes()).collect(),
                },
            ),
            (
                "x.nested",
                Value::Array(vec![Value::Scalars {
                    elem: 0,
                    data: vec![1, 2],
                }]),
            ),
        ],
        &[
            Tensor {
                name: "a.weight",
                dims: &[32, 2],
                type_id: 1,
                data: &f16,
            },
            Tensor {
                name: "b.weight",
                dims: &[64],
                type_id: 3,
                data: &q4_1,
            },
            Tensor {
                name: "c.weight",
                dims: &[32, 2],
                type_id: 8,
                data: &q8_0,
            },
        ],
    )
}

/// Parses with allocation tracking; on success, reads every tensor the way a loader would.
fn check(bytes: &[u8]) -> Result<(), String> {
    // One parse at a time is measured: the tests share LARGEST.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::Relaxed);
    ON.set(true);
    let parsed = Gguf::parse(bytes);
    ON.set(false);
    let largest = LARGEST.load(Ordering::Relaxed);
    let bound = 8 * bytes.len() + 4096;
    if largest > bound {
        return Err(format!(
            "parsing {} bytes allocated {largest} bytes at once",
            bytes.len()
        ));
    }
    if let Ok(g) = parsed {
        for t in &g.tensors {
            let data = bytes
                .get(t.start..t.start + t.len)
                .ok_or_else(|| format!("tensor {} range outside the file", t.name))?;
            if t.ty.supported() {
                let n = usize::try_from(t.elements()).map_err(|e| e.to_string())?;
                if n > 1 << 20 {
                    return Err(format!("{} claims {n} elements in {} bytes", t.name, t.len));
                }
                let mut out = vec![0f32; n];
                dequantize(t.ty, data, &mut out)?;
            }
        }
    }
    Ok(())
}

#[test]
fn the_valid_file_reads() {
    let b = valid();
    let g = Gguf::parse(&b).expect("valid file");
    assert_eq!(g.tensors.len(), 3);
    assert_eq!(g.meta.len(), 10);
    check(&b).expect("check");
}

/// Offsets of the fields a hostile file would lie in: the counts, then (found by walking the
/// valid file's layout) string lengths, array counts, dimension counts, dims, types, offsets.
fn field_offsets(b: &[u8]) -> Vec<usize> {
    let mut v = vec![4, 8, 16];
    // Every 8-byte-aligned position in the header part is a plausible length/count field; the
    // mutations below write over them with absurd values.
    let end = Gguf::parse(b)
        .ok()
        .and_then(|g| g.tensors.iter().map(|t| t.start).min())
        .unwrap_or(b.len());
    v.extend(24..end);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn truncated_files_are_refused(cut in 0usize..4000) {
        let b = valid();
        let cut = cut % b.len();
        prop_assert!(Gguf::parse(&b[..cut]).is_err() || cut == b.len());
        check(&b[..cut]).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn flipped_bytes_never_panic(flips in prop::collection::vec((0usize..4000, any::<u8>()), 1..8)) {
        let mut b = valid();
        let n = b.len();
        for (at, x) in flips {
            b[at % n] ^= x | 1;
        }
        check(&b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn absurd_fields_never_panic_or_allocate(
        pick in any::<prop::sample::Index>(),
        value in prop_oneof![
            Just(u64::MAX), Just(u64::MAX / 2), Just(1u64 << 40), Just(1u64 << 32),
            Just(0u64), Just(u32::MAX as u64), any::<u64>(), 0u64..64,
        ],
        width in prop_oneof![Just(4usize), Just(8usize)],
    ) {
        let mut b = valid();
        let offsets = field_offsets(&b);
        let at = offsets[pick.index(offsets.len())];
        let end = (at + width).min(b.len());
        let bytes = value.to_le_bytes();
        b[at..end].copy_from_slice(&bytes[..end - at]);
        check(&b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn random_garbage_after_a_valid_header_never_panics(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend_from_slice(&tail);
        check(&b).map_err(TestCaseError::fail)?;
    }
}

/// A real file (`SEEDANCE_TEST_GGUF`; scripts/test.sh points it at the default model its deps
/// stage fetched): its header, metadata and every tensor read, and every tensor dequantizes to
/// finite values. Without the variable (a bare `cargo test`) there is nothing to read.
#[test]
fn a_real_file_reads_when_given() {
    let Some(path) = std::env::var_os("SEEDANCE_TEST_GGUF") else {
        return;
    };
    let bytes = std::fs::read(&path).expect("read SEEDANCE_TEST_GGUF");
    let g = Gguf::parse(&bytes).expect("parse");
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .expect("architecture");
    eprintln!(
        "{path:?}: GGUF v{}, {arch}, {} metadata keys, {} tensors",
        g.version,
        g.meta.len(),
        g.tensors.len()
    );
    let mut keys: Vec<_> = g.meta.keys().collect();
    keys.sort();
    for k in keys {
        let v = &g.meta[k];
        match v.array_len() {
            Some(n) => eprintln!("  {k}: array of {n}"),
            None => eprintln!("  {k}: {v:?}"),
        }
    }
    for t in g.tensors.iter().take(12) {
        eprintln!("  {} {:?} {}", t.name, t.dims, t.ty.name());
    }
    for t in &g.tensors {
        let mut out = vec![0f32; t.elements() as usize];
        dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut out).expect("dequantize");
        assert!(
            out.iter().all(|x| x.is_finite()),
            "{}: non-finite weights",
            t.name
        );
    }
}
