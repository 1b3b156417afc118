//! `seedance-bench`: load generator for the WebSocket interface (SPEC 7).
//!
//! `seedance-bench ws`: N connections, each running generations back to back for a duration
//! (or a request count); reports delta messages/s, output tokens/s, requests/s and TTFT / ITL /
//! TPOT / end-to-end latency percentiles with `vllm bench serve`'s definitions, as a table and
//! JSON. `seedance-bench idle`: opens N WebSocket connections and holds them (memory per idle
//! connection is measured from the server's RSS around it; see perf/idle_memory.sh).
//! One monoio runtime on one (optionally pinned) core drives every connection.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use clap::{Parser, Subcommand};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use seedance::ws::codec::{Decoder, Message};
use seedance::ws::frame::{write_frame_masked, Limits, OpCode, Role};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "seedance-bench",
    about = "Load generator for seedance (WebSocket)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream generations over WebSocket and report throughput and latency.
    Ws(WsArgs),
    /// Open connections and hold them idle.
    Idle(IdleArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct WsArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Concurrent connections (one generation in flight each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Output tokens per generation (max_tokens).
    #[arg(long, default_value_t = 256)]
    output_len: u32,
    /// Input length in words of the prompt.
    #[arg(long, default_value_t = 16)]
    input_len: usize,
    /// token | chunk | full.
    #[arg(long, default_value = "token")]
    stream_mode: String,
    /// Seconds of measurement after warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Print the result as JSON too.
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
    #[arg(long)]
    cpu: Option<usize>,
}

/// Per-run measurements (only while measuring).
#[derive(Default)]
struct Stats {
    deltas: u64,
    tokens: u64,
    requests: u64,
    errors: u64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tpot: Vec<f64>,
    e2e: Vec<f64>,
}

fn main() {
    let args = Args::parse();
    let cpu = match &args.cmd {
        Cmd::Ws(a) => a.cpu,
        Cmd::Idle(a) => a.cpu,
    };
    if let Some(cpu) = cpu {
        let _ = monoio::utils::bind_to_cpu_set([cpu]);
    }
    let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(8192)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seedance-bench: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        match args.cmd {
            Cmd::Ws(a) => run_ws(a).await,
            Cmd::Idle(a) => run_idle(a).await,
        }
    });
    std::process::exit(code);
}

/// A client WebSocket connection.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    dec: Decoder,
}

impl Client {
    async fn connect(addr: SocketAddr, query: &str) -> std::io::Result<Client> {
        let stream = TcpStream::connect_addr(addr).await?;
        stream.set_nodelay(true)?;
        let req = format!(
            "GET /v1/chat{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut c = Client {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            dec: Decoder::new(Role::Client, Limits::default()),
        };
        let (res, _) = c.stream.write_all(req.into_bytes()).await;
        res?;
        loop {
            if let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !c.buf.starts_with(b"HTTP/1.1 101") {
                    return Err(std::io::Error::other(
                        String::from_utf8_lossy(&c.buf[..end]).into_owned(),
                    ));
                }
                let _ = c.buf.split_to(end + 4);
                break;
            }
            c.read().await?;
        }
        Ok(c)
    }

    async fn read(&mut self) -> std::io::Result<()> {
        use monoio::buf::IoBufMut;
        self.buf.reserve(64 * 1024);
        let len = self.buf.len();
        let cap = self.buf.capacity();
        let owned = std::mem::take(&mut self.buf);
        let (res, slice) = self.stream.read(owned.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        match res? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        let mut f = BytesMut::with_capacity(text.len() + 14);
        write_frame_masked(&mut f, OpCode::Text, text.as_bytes(), [1, 2, 3, 4]);
        let (res, _) = self.stream.write_all(f.freeze()).await;
        res.map(|_| ())
    }

    async fn send_pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let mut f = BytesMut::with_capacity(payload.len() + 14);
        write_frame_masked(&mut f, OpCode::Pong, payload, [5, 6, 7, 8]);
        let (res, _) = self.stream.write_all(f.freeze()).await;
        res.map(|_| ())
    }
}

fn prompt(words: usize) -> String {
    let mut p = String::new();
    for i in 0..words {
        if i > 0 {
            p.push(' ');
        }
        p.push_str("word");
    }
    p
}

/// One connection's loop: generate, read to `done`, repeat until `end`.
async fn ws_worker(
    a: WsArgs,
    n: usize,
    start_measure: Instant,
    end: Instant,
    stats: Rc<RefCell<Stats>>,
) {
    let query = format!("?stream_mode={}", a.stream_mode);
    let mut c = match Client::connect(a.addr, &query).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connection {n}: {e}");
            stats.borrow_mut().errors += 1;
            return;
        }
    };
    let p = prompt(a.input_len);
    let mut req_no = 0u64;
    let mut out = BytesMut::new();
    while Instant::now() < end {
        req_no += 1;
        out.clear();
        out.put_slice(b"{\"type\":\"generate\",\"id\":\"r");
        out.put_slice(req_no.to_string().as_bytes());
        out.put_slice(
            format!(
                "\",\"prompt\":\"{p}\",\"max_tokens\":{},\"temperature\":0}}",
                a.output_len
            )
            .as_bytes(),
        );
        let sent = Instant::now();
        let text = String::from_utf8_lossy(&out).into_owned();
        if c.send_text(&text).await.is_err() {
            stats.borrow_mut().errors += 1;
            return;
        }
        let mut first: Option<Instant> = None;
        let mut last = sent;
        let mut deltas = 0u64;
        let mut itl: Vec<f64> = Vec::new();
        let measuring = sent >= start_measure;
        'req: loop {
            loop {
                match c.dec.decode(&mut c.buf) {
                    Ok(Some(Message::Text(t))) => {
                        let now = Instant::now();
                        if t.starts_with(b"{\"type\":\"delta\"") {
                            deltas += 1;
                            match first {
                                None => first = Some(now),
                                Some(_) => {
                                    if measuring {
                                        itl.push(now.duration_since(last).as_secs_f64());
                                    }
                                }
                            }
                            last = now;
                            continue;
                        }
                        // Everything but a delta is rare: parse it properly.
                        let v: serde_json::Value = serde_json::from_slice(&t).unwrap_or_default();
                        match v["type"].as_str() {
                            Some("done") => {
                                let toks =
                                    v["usage"]["completion_tokens"].as_u64().unwrap_or(deltas);
                                if measuring && now <= end {
                                    let mut s = stats.borrow_mut();
                                    s.requests += 1;
                                    s.deltas += deltas;
                                    s.tokens += toks;
                                    let e2e = now.duration_since(sent).as_secs_f64();
                                    s.e2e.push(e2e);
                                    if let Some(f) = first {
                                        let ttft = f.duration_since(sent).as_secs_f64();
                                        s.ttft.push(ttft);
                                        if toks > 1 {
                                            s.tpot.push((e2e - ttft) / (toks - 1) as f64);
                                        }
                                    }
                                    s.itl.append(&mut itl);
                                }
                                break 'req;
                            }
                            Some("error") => {
                                eprintln!("connection {n}: {v}");
                                stats.borrow_mut().errors += 1;
                                break 'req;
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(Message::Ping(p))) => {
                        let _ = c.send_pong(&p).await;
                    }
                    Ok(Some(Message::Close(_))) => return,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("connection {n}: {e}");
                        stats.borrow_mut().errors += 1;
                        return;
                    }
                }
            }
            if c.read().await.is_err() {
                stats.borrow_mut().errors += 1;
                return;
            }
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

async fn run_ws(a: WsArgs) -> i32 {
    let stats = Rc::new(RefCell::new(Stats::default()));
    let t0 = Instant::now();
    let start_measure = t0 + Duration::from_secs_f64(a.warmup);
    let end = start_measure + Duration::from_secs_f64(a.duration);
    let mut handles = Vec::with_capacity(a.connections);
    for n in 0..a.connections {
        handles.push(monoio::spawn(ws_worker(
            a.clone(),
            n,
            start_measure,
            end,
            stats.clone(),
        )));
        if n % 64 == 63 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for h in handles {
        h.await;
    }
    let mut s = stats.borrow_mut();
    let secs = a.duration;
    let row = |name: &str, v: &mut Vec<f64>| -> serde_json::Value {
        let r = serde_json::json!({
            "mean_ms": mean(v) * 1e3, "p50_ms": pct(v, 50.0) * 1e3, "p90_ms": pct(v, 90.0) * 1e3,
            "p95_ms": pct(v, 95.0) * 1e3, "p99_ms": pct(v, 99.0) * 1e3,
        });
        println!(
            "{name:<6} mean {:>9.3}  p50 {:>9.3}  p90 {:>9.3}  p95 {:>9.3}  p99 {:>9.3}  (ms)",
            mean(v) * 1e3,
            pct(v, 50.0) * 1e3,
            pct(v, 90.0) * 1e3,
            pct(v, 95.0) * 1e3,
            pct(v, 99.0) * 1e3
        );
        r
    };
    println!(
        "connections {}  output_len {}  mode {}  measured {:.1}s",
        a.connections, a.output_len, a.stream_mode, secs
    );
    println!(
        "requests {}  errors {}  req/s {:.1}  deltas/s {:.0}  output tok/s {:.0}",
        s.requests,
        s.errors,
        s.requests as f64 / secs,
        s.deltas as f64 / secs,
        s.tokens as f64 / secs
    );
    let (mut ttft, mut itl, mut tpot, mut e2e) = (
        std::mem::take(&mut s.ttft),
        std::mem::take(&mut s.itl),
        std::mem::take(&mut s.tpot),
        std::mem::take(&mut s.e2e),
    );
    let j = serde_json::json!({
        "connections": a.connections, "output_len": a.output_len, "stream_mode": a.stream_mode,
        "duration_s": secs, "requests": s.requests, "errors": s.errors,
        "request_throughput": s.requests as f64 / secs,
        "delta_messages_per_s": s.deltas as f64 / secs,
        "output_token_throughput": s.tokens as f64 / secs,
        "ttft": row("TTFT", &mut ttft), "itl": row("ITL", &mut itl),
        "tpot": row("TPOT", &mut tpot), "e2el": row("E2E", &mut e2e),
    });
    if a.json {
        println!("{j}");
    }
    if s.requests == 0 || s.errors > 0 {
        1
    } else {
        0
    }
}

async fn run_idle(a: IdleArgs) -> i32 {
    let mut conns = Vec::with_capacity(a.connections);
    let mut failed = 0;
    for n in 0..a.connections {
        match Client::connect(a.addr, "").await {
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
