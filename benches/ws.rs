//! WebSocket hot paths: unmasking, decoding many small client frames, and
//! encoding small server deltas.
//!
//! Run: `cargo bench --bench ws` (quick look: `-- --warm-up-time 1 --measurement-time 2`).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seedance::ws::{
    apply_mask, parse_header, write_frame, write_frame_masked, Decoder, Limits, Message, OpCode,
    Role,
};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A ~60-byte delta, the typical server → client message.
const DELTA: &[u8] = br#"{"type":"delta","id":"c1","seq":42,"text":" the quick brown"}"#;

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for len in [16usize, 125, 4096, 65536] {
        let mut buf = vec![0xa5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box(KEY)))
        });
    }
    group.finish();
}

/// `count` masked text frames of `DELTA`, as a client would send them.
fn client_frames(count: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for _ in 0..count {
        write_frame_masked(&mut buf, OpCode::Text, DELTA, KEY);
    }
    buf
}

fn decode(c: &mut Criterion) {
    const FRAMES: usize = 1000;
    let input = client_frames(FRAMES);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("parse_header_1000_frames", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut n = 0;
            while let Ok(Some(h)) = parse_header(&input[at..], Role::Server, &Limits::default()) {
                at += h.header_len + h.payload_len as usize;
                n += 1;
            }
            black_box(n)
        })
    });
    group.bench_function("server_decode_1000_masked_text", |b| {
        b.iter_batched_ref(
            || (input.clone(), Decoder::new(Role::Server, Limits::default())),
            |(buf, dec)| {
                let mut n = 0;
                while let Ok(Some(Message::Text(t))) = dec.decode(buf) {
                    n += t.len();
                }
                black_box(n)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // The load generator's side: unmasked server deltas into a client decoder.
    let mut server_out = BytesMut::new();
    for _ in 0..FRAMES {
        write_frame(&mut server_out, OpCode::Text, DELTA);
    }
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("client_decode_1000_deltas", |b| {
        b.iter_batched_ref(
            || {
                (
                    server_out.clone(),
                    Decoder::new(Role::Client, Limits::default()),
                )
            },
            |(buf, dec)| {
                let mut n = 0;
                while let Ok(Some(_)) = dec.decode(buf) {
                    n += 1;
                }
                black_box(n)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    const FRAMES: usize = 1000;
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes((FRAMES * (2 + DELTA.len())) as u64));
    let mut dst = BytesMut::with_capacity(FRAMES * 80);
    group.bench_function("server_delta_1000", |b| {
        b.iter(|| {
            dst.clear();
            for _ in 0..FRAMES {
                write_frame(&mut dst, OpCode::Text, black_box(DELTA));
            }
            black_box(dst.len())
        })
    });
    group.bench_function("client_masked_delta_1000", |b| {
        b.iter(|| {
            dst.clear();
            for _ in 0..FRAMES {
                write_frame_masked(&mut dst, OpCode::Text, black_box(DELTA), KEY);
            }
            black_box(dst.len())
        })
    });
    group.finish();
}

criterion_group!(benches, unmask, decode, encode);
criterion_main!(benches);
