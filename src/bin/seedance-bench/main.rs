//! `seedance-bench`: load generator for seedance's WebSocket and SSE interfaces (SPEC 7).
//!
//! `seedance-bench ws|sse`: runs generations with fixed concurrency (closed loop, the default)
//! or Poisson arrivals at `--request-rate` with at most `--connections` in flight (like
//! `vllm bench serve --request-rate R --max-concurrency C`), for `--duration` seconds or
//! `--num-requests` requests, after a warm-up. Reports TTFT, ITL, TPOT and end-to-end latency
//! (mean, p50, p90, p95, p99) with vLLM's definitions — TTFT: send → first delta; ITL: gaps
//! between deltas; TPOT: (e2e − TTFT) / (output tokens − 1); E2E: send → end — plus
//! requests/s, output tokens/s and delta messages/s, as a table and (`--json`) as JSON.
//! `seedance-bench idle`: opens N WebSocket connections and holds them (perf/idle_memory.sh).
//! `seedance-bench handshakes`: TLS handshakes per second, full or resumed (perf/tls_compare.sh).
//! `--tls-ca FILE` makes `ws`, `sse` and `idle` speak TLS 1.3 too.
//! One monoio runtime, optionally pinned to one CPU, drives every connection.

mod client;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use client::{Client, Sample};
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "seedance-bench",
    about = "Load generator for seedance (WebSocket and SSE)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generations over the WebSocket protocol (`GET /v1/chat`).
    Ws(LoadArgs),
    /// Generations over OpenAI SSE (`POST /v1/completions`, `stream: true`).
    Sse(LoadArgs),
    /// Responses over OpenAI SSE (`POST /v1/responses`, `stream: true`; stored, so every
    /// delta is logged too).
    Responses(LoadArgs),
    /// Open connections and hold them idle.
    Idle(IdleArgs),
    /// TLS handshakes per second: connect, handshake, `GET /v1/models`, close, over and over.
    Handshakes(HandshakeArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct HandshakeArgs {
    /// The TLS listener.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// Connections made at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// PEM file of the certificates to trust.
    #[arg(long)]
    tls_ca: std::path::PathBuf,
    /// Resume sessions with the tickets the server sent (else every handshake is full).
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    cpu: Option<usize>,
}

#[derive(clap::Args, Debug, Clone)]
struct LoadArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Connections, i.e. the most requests in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Poisson arrival rate in requests/s; absent = closed loop (each connection back to back).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Output tokens per request (max_tokens, with ignore_eos so every request runs to it).
    #[arg(long, default_value_t = 256)]
    output_len: u32,
    /// Prompt length in words.
    #[arg(long, default_value_t = 16)]
    input_len: usize,
    /// WebSocket stream mode: token | chunk | full.
    #[arg(long, default_value = "token")]
    stream_mode: String,
    /// WebSocket message compression: none | zstd | deflate (permessage-deflate).
    #[arg(long, default_value = "none")]
    compression: String,
    /// Speak TLS (1.3) to `--addr`, trusting the certificates in this PEM file.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Seconds measured after warm-up (ignored when --num-requests is given).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Measured requests (instead of a duration).
    #[arg(long)]
    num_requests: Option<u64>,
    /// Warm-up seconds (requests sent during it are not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Model name sent in requests (SSE needs one).
    #[arg(long, default_value = "")]
    model: String,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Also print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Seconds to hold the connections after all are open.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Ask for compression (none | zstd | deflate).
    #[arg(long, default_value = "none")]
    compression: String,
    /// Speak TLS (1.3), trusting the certificates in this PEM file.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() {
    let args = Args::parse();
    let (cpu, tls) = match &args.cmd {
        Cmd::Ws(a) | Cmd::Sse(a) | Cmd::Responses(a) => {
            (a.cpu, a.tls_ca.clone().map(|p| (p, true)))
        }
        Cmd::Idle(a) => (a.cpu, a.tls_ca.clone().map(|p| (p, true))),
        Cmd::Handshakes(a) => (a.cpu, Some((a.tls_ca.clone(), a.resume))),
    };
    if let Some(cpu) = cpu {
        let _ = monoio::utils::bind_to_cpu_set([cpu]);
    }
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(8192)
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seedance-bench: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        if let Some((ca, resume)) = tls {
            if let Err(e) = client::use_tls(&ca, resume) {
                eprintln!("seedance-bench: {}: {e}", ca.display());
                return 1;
            }
        }
        match args.cmd {
            Cmd::Ws(a) => run_load(a, Proto::Ws).await,
            Cmd::Sse(a) => run_load(a, Proto::Sse).await,
            Cmd::Responses(a) => run_load(a, Proto::Responses).await,
            Cmd::Idle(a) => run_idle(a).await,
            Cmd::Handshakes(a) => run_handshakes(a).await,
        }
    });
    std::process::exit(code);
}

/// Shared state of one run (single-threaded).
struct Run {
    args: LoadArgs,
    sse: bool,
    /// The SSE route.
    path: &'static str,
    body: String,
    start_measure: Instant,
    /// Duration mode: no request is sent after this.
    deadline: Option<Instant>,
    /// Requests sent so far (request-count mode stops at warm-up + N... counted when measured).
    measured_sent: Cell<u64>,
    /// Poisson arrival times, consumed in order by whichever connection is free.
    next_arrival: Cell<Instant>,
    rng: RefCell<rand_chacha::ChaCha8Rng>,
    samples: RefCell<Vec<Sample>>,
    errors: Cell<u64>,
}

impl Run {
    /// The time the next request may be sent, or None when the run is over.
    fn claim(&self) -> Option<Instant> {
        let now = Instant::now();
        let at = match self.args.request_rate {
            None => now,
            Some(rate) => {
                let t = self.next_arrival.get();
                let u: f64 = self.rng.borrow_mut().random_range(f64::EPSILON..1.0);
                self.next_arrival
                    .set(t + Duration::from_secs_f64(-u.ln() / rate.max(1e-9)));
                t
            }
        };
        if let Some(d) = self.deadline {
            if at >= d {
                return None;
            }
        }
        if at >= self.start_measure {
            if let Some(n) = self.args.num_requests {
                if self.measured_sent.get() >= n {
                    return None;
                }
            }
            self.measured_sent.set(self.measured_sent.get() + 1);
        }
        Some(at)
    }
}

async fn worker(run: Rc<Run>, n: usize) {
    let query = format!("?stream_mode={}", run.args.stream_mode);
    let connect = || async {
        if run.sse {
            Client::http(run.args.addr).await
        } else {
            Client::websocket(run.args.addr, &query, &run.args.compression).await
        }
    };
    let mut client = match connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connection {n}: {e}");
            run.errors.set(run.errors.get() + 1);
            return;
        }
    };
    let mut req_no = 0u64;
    while let Some(at) = run.claim() {
        let now = Instant::now();
        if at > now {
            monoio::time::sleep(at - now).await;
        }
        req_no += 1;
        let sample = if run.sse {
            client.sse_request(run.path, &run.body).await
        } else {
            let body = run
                .body
                .replacen("\"id\":\"r\"", &format!("\"id\":\"r{n}-{req_no}\""), 1);
            client.ws_request(&body).await
        };
        if let Some(e) = &sample.error {
            eprintln!("connection {n}: {e}");
            run.errors.set(run.errors.get() + 1);
            return;
        }
        if sample.sent.is_some_and(|s| s >= run.start_measure) {
            run.samples.borrow_mut().push(sample);
        }
    }
}

fn percentiles(v: &mut [f64]) -> [f64; 5] {
    if v.is_empty() {
        return [f64::NAN; 5];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((q / 100.0) * (v.len() - 1) as f64).round() as usize];
    [
        v.iter().sum::<f64>() / v.len() as f64,
        p(50.0),
        p(90.0),
        p(95.0),
        p(99.0),
    ]
}

/// What `run_load` speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Ws,
    Sse,
    Responses,
}

async fn run_load(args: LoadArgs, proto: Proto) -> i32 {
    let prompt = vec!["word"; args.input_len].join(" ");
    let sse = proto != Proto::Ws;
    let body = if proto == Proto::Responses {
        serde_json::json!({"model": args.model, "input": prompt, "max_output_tokens": args.output_len,
            "temperature": 0, "stream": true})
    } else if sse {
        serde_json::json!({"model": args.model, "prompt": prompt, "max_tokens": args.output_len,
            "ignore_eos": true, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})
    } else {
        serde_json::json!({"type": "generate", "id": "r", "prompt": prompt, "max_tokens": args.output_len,
            "ignore_eos": true, "temperature": 0})
    }
    .to_string();
    let t0 = Instant::now();
    let start_measure = t0 + Duration::from_secs_f64(args.warmup);
    let deadline = args
        .num_requests
        .is_none()
        .then(|| start_measure + Duration::from_secs_f64(args.duration));
    let run = Rc::new(Run {
        sse,
        path: if proto == Proto::Responses {
            "/v1/responses"
        } else {
            "/v1/completions"
        },
        body,
        start_measure,
        deadline,
        measured_sent: Cell::new(0),
        next_arrival: Cell::new(t0),
        rng: RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(args.seed)),
        samples: RefCell::new(Vec::new()),
        errors: Cell::new(0),
        args,
    });
    let mut handles = Vec::new();
    for n in 0..run.args.connections {
        handles.push(monoio::spawn(worker(run.clone(), n)));
        if n % 64 == 63 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for h in handles {
        h.await;
    }
    report(&run)
}

fn report(run: &Run) -> i32 {
    let a = &run.args;
    let samples = run.samples.borrow();
    let first = samples.iter().filter_map(|s| s.sent).min();
    let last = samples.iter().filter_map(|s| s.end).max();
    let secs = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };
    let (mut ttft, mut itl, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut tokens, mut deltas, mut wire) = (0u64, 0u64, 0u64);
    for s in samples.iter() {
        let (Some(sent), Some(end)) = (s.sent, s.end) else {
            continue;
        };
        tokens += s.tokens;
        deltas += s.deltas;
        wire += s.wire_bytes;
        let total = end.duration_since(sent).as_secs_f64();
        e2e.push(total);
        if let Some(f) = s.first {
            let t = f.duration_since(sent).as_secs_f64();
            ttft.push(t);
            if s.tokens > 1 {
                tpot.push((total - t) / (s.tokens - 1) as f64);
            }
        }
        itl.extend_from_slice(&s.gaps);
    }
    let n = samples.len() as u64;
    let proto = match (run.sse, run.path) {
        (false, _) => "ws",
        (true, "/v1/responses") => "responses",
        (true, _) => "sse",
    };
    let rate = a
        .request_rate
        .map_or("inf (closed loop)".to_string(), |r| format!("{r}/s"));
    println!(
        "protocol {proto}  connections {}  request rate {rate}  input {} words  output {} tokens",
        a.connections, a.input_len, a.output_len
    );
    println!(
        "requests {n}  errors {}  duration {secs:.2}s  req/s {:.2}  output tok/s {:.1}  deltas/s {:.0}",
        run.errors.get(),
        n as f64 / secs,
        tokens as f64 / secs,
        deltas as f64 / secs
    );
    if !run.sse {
        println!(
            "compression {}  bytes received {wire}  bytes/delta {:.1}",
            a.compression,
            wire as f64 / deltas.max(1) as f64
        );
    }
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>10} {:>10}   (ms)",
        "", "mean", "p50", "p90", "p95", "p99"
    );
    let mut json = serde_json::Map::new();
    for (name, v) in [
        ("ttft", &mut ttft),
        ("itl", &mut itl),
        ("tpot", &mut tpot),
        ("e2el", &mut e2e),
    ] {
        let p = percentiles(v).map(|x| x * 1e3);
        println!(
            "{:<6} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            name.to_uppercase(),
            p[0],
            p[1],
            p[2],
            p[3],
            p[4]
        );
        json.insert(
            name.into(),
            serde_json::json!({"mean_ms": p[0], "p50_ms": p[1], "p90_ms": p[2], "p95_ms": p[3], "p99_ms": p[4]}),
        );
    }
    if a.json {
        json.insert("protocol".into(), proto.into());
        json.insert("connections".into(), a.connections.into());
        json.insert("request_rate".into(), a.request_rate.into());
        json.insert("completed".into(), n.into());
        json.insert("errors".into(), run.errors.get().into());
        json.insert("duration_s".into(), secs.into());
        json.insert("request_throughput".into(), (n as f64 / secs).into());
        json.insert("output_throughput".into(), (tokens as f64 / secs).into());
        json.insert("delta_messages_per_s".into(), (deltas as f64 / secs).into());
        json.insert("compression".into(), a.compression.clone().into());
        json.insert("wire_bytes".into(), wire.into());
        json.insert(
            "wire_bytes_per_delta".into(),
            (wire as f64 / deltas.max(1) as f64).into(),
        );
        println!("{}", serde_json::Value::Object(json));
    }
    i32::from(n == 0 || run.errors.get() > 0)
}

async fn run_handshakes(a: HandshakeArgs) -> i32 {
    let done = Rc::new(Cell::new(0u64));
    let errors = Rc::new(Cell::new(0u64));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.duration);
    let workers: Vec<_> = (0..a.connections.max(1))
        .map(|_| {
            let (done, errors) = (done.clone(), errors.clone());
            monoio::spawn(async move {
                while Instant::now() < deadline {
                    let r = match Client::http(a.addr).await {
                        Ok(mut c) => c.get("/v1/models").await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = &r {
                        if errors.get() < 3 {
                            eprintln!("handshake: {e}");
                        }
                    }
                    let counter = if r.is_ok() { &done } else { &errors };
                    counter.set(counter.get() + 1);
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "TLS handshakes ({}): {} in {secs:.2}s = {:.0}/s, {} errors ({} at once)",
        if a.resume { "resumed" } else { "full" },
        done.get(),
        done.get() as f64 / secs,
        errors.get(),
        a.connections
    );
    i32::from(done.get() == 0 || errors.get() > 0)
}

async fn run_idle(a: IdleArgs) -> i32 {
    let mut conns = Vec::with_capacity(a.connections);
    let mut failed = 0;
    for n in 0..a.connections {
        match Client::websocket(a.addr, "", &a.compression).await {
            Ok(c) => conns.push(c),
            Err(e) => {
                failed += 1;
                if failed < 5 {
                    eprintln!("connection {n}: {e}");
                }
            }
        }
    }
    println!(
        "open {} idle connections ({failed} failed); holding {:.0}s",
        conns.len(),
        a.hold
    );
    monoio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    drop(conns);
    i32::from(failed > 0)
}
