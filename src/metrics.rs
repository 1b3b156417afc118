//! Every metric, one place, one prefix (`seedance_`), Prometheus text at `/metrics`.
//!
//! Counters are per shard: each [`ShardMetrics`] is written by its own shard thread only, with
//! plain relaxed load + store (no read-modify-write, no shared cache line), and read by whichever
//! shard serves a scrape, which merges them. The engine thread has its own [`EngineMetrics`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A counter written by one thread only.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    /// For gauges kept as counters of ups and downs by one writer.
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.saturating_sub(n), Ordering::Relaxed);
    }
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds (seconds) shared by the latency histograms.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A fixed-bucket histogram written by one thread.
#[derive(Default)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BUCKETS.len()],
    count: Counter,
    sum_ns: Counter,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_ns.add(d.as_nanos() as u64);
    }
}

/// Handshake failure reasons, in label order (SPEC 6: classified).
pub const HANDSHAKE_REASONS: &[&str] = &[
    "bad_method",
    "bad_version",
    "missing_upgrade",
    "missing_connection",
    "bad_key",
    "bad_model_id",
    "model_not_found",
    "bad_stream_mode",
    "bad_compression",
    "unknown_tenant",
    "bad_credentials",
    "model_not_allowed",
    "head_too_large",
    "timeout",
    "bad_request",
    "over_capacity",
    "bad_window",
    "bad_extension",
    "tls_plain_http",
    "tls_no_shared_version",
    "tls_no_shared_cipher",
    "tls_bad_certificate",
    "tls_timeout",
    "tls_protocol",
    "rate_limited",
    "ip_connections",
    "ip_rate",
];

/// Outcomes of `resume` messages, in label order (the error codes of docs/protocol.md).
pub const RESUME_OUTCOMES: &[&str] = &[
    "ok",
    "unknown_session",
    "bad_token",
    "unknown_id",
    "bad_offset",
    "already_finished",
    "not_resumable",
    "store_unavailable",
];

/// Request outcomes, in label order.
pub const OUTCOMES: &[&str] = &["stop", "length", "cancelled", "error", "rejected"];

/// WebSocket close codes sent by the server, by reason label.
pub const CLOSE_REASONS: &[&str] = &[
    "normal",
    "going_away",
    "protocol",
    "invalid_payload",
    "too_big",
    "dead_peer",
    "idle",
    "slow_reader",
];

/// Connection states (SPEC 4 state machine).
pub const STATES: &[&str] = &[
    "init",
    "handshaking",
    "active",
    "graceful_closing",
    "closed",
];

/// One shard's counters.
#[derive(Default)]
pub struct ShardMetrics {
    pub active_connections: Counter,
    pub accepted_connections: Counter,
    /// TLS handshakes completed, and how many of them resumed a session (ticket).
    pub tls_handshakes: Counter,
    pub tls_resumed: Counter,
    pub handshake_failures: [Counter; 27],
    pub http_requests: Counter,
    pub ws_messages_in: Counter,
    pub deltas_out: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub requests: [Counter; 5],
    pub generated_tokens: Counter,
    pub closes: [Counter; 8],
    pub state_time_ns: [Counter; 5],
    pub backpressure_pauses: Counter,
    pub socket_throttles: Counter,
    /// Connections whose sequences are paused now (gauge).
    pub paused_connections: Counter,
    /// Output bytes connections hold (socket queue + held for credit), summed at each tick.
    pub queued_output_bytes: Counter,
    /// Message bytes before and after zstd, and messages sent plain on a compressed connection.
    pub compress_in: Counter,
    pub compress_out: Counter,
    pub compress_plain: Counter,
    /// Message bytes before and after permessage-deflate.
    pub deflate_in: Counter,
    pub deflate_out: Counter,
    /// Credit-window connections: messages sent at once, messages held, flushes of held ones.
    pub flow_sent_now: Counter,
    pub flow_held: Counter,
    pub flow_flushes: Counter,
    /// The shard's zstd level now (0: breaker open) and its CPU load in permille.
    pub zstd_level: Counter,
    pub cpu_load_permille: Counter,
    pub resumes: [Counter; 8],
    /// `resume` received → first replayed message queued.
    pub resume_latency: Histogram,
    pub takeovers: Counter,
    /// Leases this shard renews (resumable generations it owns).
    pub leases_held: Counter,
    /// Batches that found the state queue full.
    pub store_drops: Counter,
    pub ws_rtt: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl ShardMetrics {
    pub fn handshake_failure(&self, label: &str) {
        let i = HANDSHAKE_REASONS
            .iter()
            .position(|r| *r == label)
            .unwrap_or(14);
        self.handshake_failures[i].inc();
    }
    pub fn outcome(&self, label: &str) {
        let i = OUTCOMES.iter().position(|r| *r == label).unwrap_or(3);
        self.requests[i].inc();
    }
    pub fn resume(&self, label: &str) {
        if let Some(i) = RESUME_OUTCOMES.iter().position(|r| *r == label) {
            self.resumes[i].inc();
        }
    }
    pub fn close(&self, label: &str) {
        if let Some(i) = CLOSE_REASONS.iter().position(|r| *r == label) {
            self.closes[i].inc();
        }
    }
}

/// The engine thread's gauges and counters.
#[derive(Default)]
pub struct EngineMetrics {
    pub batch_size: Counter,
    pub running: Counter,
    pub queue_depth: Counter,
    pub kv_usage_permille: Counter,
    pub steps: Counter,
    /// Tokens the engine generated (sampled), delivered or not.
    pub tokens: Counter,
}

/// Everything `/metrics` shows.
pub struct Registry {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub engine: Arc<EngineMetrics>,
    /// "io_uring" or "epoll", per shard, set when the shard's runtime starts.
    pub io_driver: Vec<std::sync::OnceLock<&'static str>>,
    pub model: String,
    /// This instance's name (`--instance-id`), the `instance_id` label of
    /// `seedance_instance_info`.
    pub instance_id: String,
    /// The state thread's handle, when resume is on.
    pub store: Option<Arc<crate::store::thread::StoreHandle>>,
    /// zstd context memory, shared with the shards.
    pub compression: Option<Arc<crate::session::compress::Budget>>,
    /// The tenants and their shared counters.
    pub tenants: std::sync::Arc<crate::ws::tenant::TenantTable>,
}

fn sum<'a>(it: impl Iterator<Item = &'a Counter>) -> u64 {
    it.map(Counter::get).sum()
}

impl Registry {
    /// Per-tenant counters (shared atomics of `session::limits::TenantState`).
    fn tenant_metrics(&self, w: &mut String) {
        let tenants = self.tenants.current();
        use crate::session::limits::TenantState;
        use std::sync::atomic::Ordering::Relaxed;
        // One sample per tenant of a value read from its shared state.
        let per_tenant = |w: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          f: &dyn Fn(&TenantState) -> u64| {
            header(w, name, kind, help);
            for t in tenants.iter() {
                let _ = writeln!(w, "{name}{{tenant=\"{}\"}} {}", t.id, f(&t.state));
            }
        };
        per_tenant(
            w,
            "seedance_tenant_requests_total",
            "counter",
            "Requests admitted per tenant.",
            &|s| s.admitted.load(Relaxed),
        );
        header(
            w,
            "seedance_tenant_rate_limited_total",
            "counter",
            "Requests and connections refused per tenant, by the limit that refused them.",
        );
        for t in tenants.iter() {
            for (i, l) in crate::session::limits::LIMIT_LABELS.iter().enumerate() {
                let n = t.state.refused[i].load(Relaxed);
                let _ = writeln!(
                    w,
                    "seedance_tenant_rate_limited_total{{tenant=\"{}\",limit=\"{l}\"}} {n}",
                    t.id
                );
            }
        }
        per_tenant(
            w,
            "seedance_tenant_streams",
            "gauge",
            "Streams running per tenant.",
            &|s| u64::from(s.streams()),
        );
        per_tenant(
            w,
            "seedance_tenant_connections",
            "gauge",
            "WebSocket connections open per tenant.",
            &|s| u64::from(s.connections()),
        );
        per_tenant(
            w,
            "seedance_tenant_tokens_charged_total",
            "counter",
            "Tokens charged per tenant (prompt + max_tokens up front, less the refunds at the end).",
            &|s| s.tokens_charged.load(Relaxed),
        );
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let tenants = self.tenants.current();
        let mut o = String::with_capacity(8192);
        let sh = &self.shards;
        let w = &mut o;
        let _ = write!(
            w,
            "# HELP seedance_instance_info This instance (--instance-id) and what it serves.\n\
             # TYPE seedance_instance_info gauge\n\
             seedance_instance_info{{instance_id=\"{}\",model=\"{}\",version=\"{}\"}} 1\n",
            label(&self.instance_id),
            label(&self.model),
            env!("CARGO_PKG_VERSION")
        );
        for driver in ["io_uring", "epoll"] {
            let n = self
                .io_driver
                .iter()
                .filter(|d| d.get() == Some(&driver))
                .count();
            metric(
                w,
                "seedance_io_driver",
                "gauge",
                "Shards using each I/O driver.",
            );
            let _ = writeln!(w, "seedance_io_driver{{driver=\"{driver}\"}} {n}");
        }
        header(
            w,
            "seedance_active_connections",
            "gauge",
            "Open connections per core.",
        );
        for (i, s) in sh.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_active_connections{{core=\"{i}\"}} {}",
                s.active_connections.get()
            );
        }
        simple(
            w,
            "seedance_connections_accepted_total",
            "counter",
            "Connections accepted.",
            sum(sh.iter().map(|s| &s.accepted_connections)),
        );
        header(
            w,
            "seedance_tls_handshakes_total",
            "counter",
            "TLS handshakes completed: full, or resumed with a session ticket.",
        );
        let (all, resumed) = (
            sum(sh.iter().map(|s| &s.tls_handshakes)),
            sum(sh.iter().map(|s| &s.tls_resumed)),
        );
        let _ = writeln!(
            w,
            "seedance_tls_handshakes_total{{kind=\"full\"}} {}\nseedance_tls_handshakes_total{{kind=\"resumed\"}} {resumed}",
            all.saturating_sub(resumed)
        );
        header(
            w,
            "seedance_handshake_failures_total",
            "counter",
            "Failed HTTP/WebSocket handshakes by reason.",
        );
        for (i, r) in HANDSHAKE_REASONS.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_handshake_failures_total{{reason=\"{r}\"}} {}",
                sum(sh.iter().map(|s| &s.handshake_failures[i]))
            );
        }
        header(
            w,
            "seedance_requests_total",
            "counter",
            "Generation requests by outcome.",
        );
        for (i, r) in OUTCOMES.iter().enumerate() {
            // Requests of no tenant (authentication off) are the rest of the total.
            let mut anonymous = sum(sh.iter().map(|s| &s.requests[i]));
            for t in tenants.iter() {
                let n = t.state.outcomes[i].load(std::sync::atomic::Ordering::Relaxed);
                anonymous = anonymous.saturating_sub(n);
                let _ = writeln!(
                    w,
                    "seedance_requests_total{{tenant=\"{}\",model=\"{}\",outcome=\"{r}\"}} {n}",
                    t.id, self.model
                );
            }
            if tenants.is_empty() || anonymous > 0 {
                let _ = writeln!(
                    w,
                    "seedance_requests_total{{tenant=\"\",model=\"{}\",outcome=\"{r}\"}} {anonymous}",
                    self.model
                );
            }
        }
        simple(
            w,
            "seedance_generated_tokens_total",
            "counter",
            "Tokens delivered to clients.",
            sum(sh.iter().map(|s| &s.generated_tokens)),
        );
        simple(
            w,
            "seedance_http_requests_total",
            "counter",
            "HTTP requests served.",
            sum(sh.iter().map(|s| &s.http_requests)),
        );
        simple(
            w,
            "seedance_ws_messages_received_total",
            "counter",
            "WebSocket data messages received.",
            sum(sh.iter().map(|s| &s.ws_messages_in)),
        );
        simple(
            w,
            "seedance_ws_deltas_sent_total",
            "counter",
            "Delta messages sent.",
            sum(sh.iter().map(|s| &s.deltas_out)),
        );
        simple(
            w,
            "seedance_ws_frames_sent_total",
            "counter",
            "WebSocket frames sent.",
            sum(sh.iter().map(|s| &s.frames_out)),
        );
        simple(
            w,
            "seedance_bytes_sent_total",
            "counter",
            "Bytes written to sockets.",
            sum(sh.iter().map(|s| &s.bytes_out)),
        );
        simple(
            w,
            "seedance_backpressure_pauses_total",
            "counter",
            "Sequences paused because a client could not keep up.",
            sum(sh.iter().map(|s| &s.backpressure_pauses)),
        );
        simple(
            w,
            "seedance_socket_throttles_total",
            "counter",
            "Writes held back for the throttle delay because a client read slower than it was sent to.",
            sum(sh.iter().map(|s| &s.socket_throttles)),
        );
        simple(
            w,
            "seedance_paused_connections",
            "gauge",
            "Connections whose sequences are paused in the engine now (client not reading).",
            sum(sh.iter().map(|s| &s.paused_connections)),
        );
        header(
            w,
            "seedance_flow_messages_total",
            "counter",
            "Messages of credit-window connections: sent at once (credit >= 64 KiB) or held.",
        );
        for (label, f) in [
            (
                "now",
                (|s: &ShardMetrics| &s.flow_sent_now) as fn(&ShardMetrics) -> &Counter,
            ),
            ("held", |s| &s.flow_held),
        ] {
            let _ = writeln!(
                w,
                "seedance_flow_messages_total{{tier=\"{label}\"}} {}",
                sum(sh.iter().map(|s| f(s)))
            );
        }
        simple(
            w,
            "seedance_flow_flushes_total",
            "counter",
            "Sends of held messages (throttle tick or window_update).",
            sum(sh.iter().map(|s| &s.flow_flushes)),
        );
        simple(
            w,
            "seedance_queued_output_bytes",
            "gauge",
            "Output held for clients: socket queues plus messages waiting for credit (every 100 ms).",
            sum(sh.iter().map(|s| &s.queued_output_bytes)),
        );
        let codecs = [
            (
                "zstd",
                sum(sh.iter().map(|s| &s.compress_in)),
                sum(sh.iter().map(|s| &s.compress_out)),
            ),
            (
                "deflate",
                sum(sh.iter().map(|s| &s.deflate_in)),
                sum(sh.iter().map(|s| &s.deflate_out)),
            ),
        ];
        header(
            w,
            "seedance_compression_input_bytes_total",
            "counter",
            "Message bytes given to each codec (zstd, permessage-deflate).",
        );
        for (codec, zin, _) in codecs {
            let _ = writeln!(
                w,
                "seedance_compression_input_bytes_total{{codec=\"{codec}\"}} {zin}"
            );
        }
        header(
            w,
            "seedance_compression_bytes_saved_total",
            "counter",
            "Bytes each codec kept off the wire.",
        );
        for (codec, zin, zout) in codecs {
            let _ = writeln!(
                w,
                "seedance_compression_bytes_saved_total{{codec=\"{codec}\"}} {}",
                zin.saturating_sub(zout)
            );
        }
        header(
            w,
            "seedance_compression_ratio",
            "gauge",
            "Output over input bytes of each codec since start.",
        );
        for (codec, zin, zout) in codecs {
            let ratio = if zin == 0 {
                1.0
            } else {
                zout as f64 / zin as f64
            };
            let _ = writeln!(w, "seedance_compression_ratio{{codec=\"{codec}\"}} {ratio}");
        }
        if let Some(b) = self.compression.as_ref() {
            simple(
                w,
                "seedance_compression_contexts",
                "gauge",
                "Compression contexts (zstd and deflate) alive now: connections with generations in flight.",
                b.contexts() as u64,
            );
            simple(
                w,
                "seedance_compression_context_bytes",
                "gauge",
                "Memory of the compression contexts alive now, in use or pooled by the shards for reuse (ZSTD_sizeof_CCtx, or the deflater allocation).",
                b.used_bytes() as u64,
            );
        }
        simple(
            w,
            "seedance_compression_plain_messages_total",
            "counter",
            "Messages of compressed connections sent plain (breaker open or context budget spent).",
            sum(sh.iter().map(|s| &s.compress_plain)),
        );
        if !tenants.is_empty() {
            self.tenant_metrics(w);
        }
        header(
            w,
            "seedance_compression_level",
            "gauge",
            "zstd level each shard uses now (0: breaker open, messages go plain).",
        );
        for (i, s) in sh.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_compression_level{{shard=\"{i}\"}} {}",
                s.zstd_level.get()
            );
        }
        header(
            w,
            "seedance_shard_cpu_load",
            "gauge",
            "CPU time of each shard thread over the last 100 ms, per wall second.",
        );
        for (i, s) in sh.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_shard_cpu_load{{shard=\"{i}\"}} {}",
                s.cpu_load_permille.get() as f64 / 1000.0
            );
        }
        header(
            w,
            "seedance_ws_closes_total",
            "counter",
            "WebSocket closes initiated by the server, by reason.",
        );
        for (i, r) in CLOSE_REASONS.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_ws_closes_total{{reason=\"{r}\"}} {}",
                sum(sh.iter().map(|s| &s.closes[i]))
            );
        }
        header(
            w,
            "seedance_connection_state_seconds_total",
            "counter",
            "Time connections spent in each state.",
        );
        for (i, r) in STATES.iter().enumerate() {
            let ns = sum(sh.iter().map(|s| &s.state_time_ns[i]));
            let _ = writeln!(
                w,
                "seedance_connection_state_seconds_total{{state=\"{r}\"}} {:.6}",
                ns as f64 / 1e9
            );
        }
        histogram(
            w,
            "seedance_ws_rtt_seconds",
            "WebSocket PING→PONG round-trip time.",
            sh,
            |s| &s.ws_rtt,
        );
        histogram(
            w,
            "seedance_time_to_first_token_seconds",
            "Time to first token.",
            sh,
            |s| &s.ttft,
        );
        histogram(
            w,
            "seedance_inter_token_latency_seconds",
            "Time between tokens of a stream.",
            sh,
            |s| &s.itl,
        );
        histogram(
            w,
            "seedance_e2e_request_latency_seconds",
            "Request latency, arrival to done.",
            sh,
            |s| &s.e2e,
        );
        let e = &self.engine;
        simple(
            w,
            "seedance_engine_batch_size",
            "gauge",
            "Sequences in the last engine step.",
            e.batch_size.get(),
        );
        simple(
            w,
            "seedance_engine_running",
            "gauge",
            "Sequences admitted to the engine.",
            e.running.get(),
        );
        simple(
            w,
            "seedance_queue_depth",
            "gauge",
            "Requests waiting for admission.",
            e.queue_depth.get(),
        );
        let kv = e.kv_usage_permille.get() as f64 / 1000.0;
        let _ = write!(w, "# HELP seedance_kv_cache_usage_ratio Fraction of KV blocks in use.\n# TYPE seedance_kv_cache_usage_ratio gauge\nseedance_kv_cache_usage_ratio {kv}\n");
        simple(
            w,
            "seedance_engine_steps_total",
            "counter",
            "Engine steps run.",
            e.steps.get(),
        );
        simple(
            w,
            "seedance_engine_tokens_total",
            "counter",
            "Tokens generated by the engine.",
            e.tokens.get(),
        );
        self.render_store(w);
        o
    }

    fn render_store(&self, w: &mut String) {
        let sh = &self.shards;
        header(
            w,
            "seedance_resumes_total",
            "counter",
            "resume messages by outcome (ok or the error code).",
        );
        for (i, r) in RESUME_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                w,
                "seedance_resumes_total{{outcome=\"{r}\"}} {}",
                sum(sh.iter().map(|s| &s.resumes[i]))
            );
        }
        histogram(
            w,
            "seedance_resume_latency_seconds",
            "resume received to first replayed message queued.",
            sh,
            |s| &s.resume_latency,
        );
        simple(
            w,
            "seedance_takeovers_total",
            "counter",
            "Generations carried on here after their owner's lease ran out or was released.",
            sum(sh.iter().map(|s| &s.takeovers)),
        );
        simple(
            w,
            "seedance_leases_held",
            "gauge",
            "Resumable generations this instance owns (leases it renews).",
            sum(sh.iter().map(|s| &s.leases_held)),
        );
        simple(
            w,
            "seedance_state_queue_drops_total",
            "counter",
            "Batches that found the state queue full (their streams became not resumable).",
            sum(sh.iter().map(|s| &s.store_drops)),
        );
        let Some(st) = &self.store else { return };
        let m = &st.metrics;
        simple(
            w,
            "seedance_state_queue_depth",
            "gauge",
            "Operations waiting for the state thread.",
            st.depth(),
        );
        histogram_of(
            w,
            "seedance_store_round_trip_seconds",
            "One state store call (a pipeline for Redis).",
            &[&m.rtt],
        );
        simple(
            w,
            "seedance_store_errors_total",
            "counter",
            "Failed state store calls (connection lost, timeouts).",
            m.errors.load(std::sync::atomic::Ordering::Relaxed),
        );
        simple(
            w,
            "seedance_store_retries_total",
            "counter",
            "Failed state store calls retried on a fresh connection (a Redis Cluster failover).",
            m.retries.load(std::sync::atomic::Ordering::Relaxed),
        );
        simple(
            w,
            "seedance_store_appended_messages_total",
            "counter",
            "Messages the state store accepted (logged, resumable).",
            m.appends.load(std::sync::atomic::Ordering::Relaxed)
                + st.local
                    .as_ref()
                    .map_or(0, |c| c.appended.load(std::sync::atomic::Ordering::Relaxed)),
        );
        let up = u64::from(st.healthy.load(std::sync::atomic::Ordering::Acquire));
        let _ = write!(w, "# HELP seedance_store_up Whether the state store answers.\n# TYPE seedance_store_up gauge\nseedance_store_up{{store=\"{}\"}} {up}\n", st.kind);
    }
}

/// A label value escaped for the text format (backslash, quote, newline).
fn label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(w, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn metric(w: &mut String, name: &str, kind: &str, help: &str) {
    if !w.contains(&format!("# TYPE {name} ")) {
        header(w, name, kind, help);
    }
}

fn simple(w: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    header(w, name, kind, help);
    let _ = writeln!(w, "{name} {v}");
}

fn histogram(
    w: &mut String,
    name: &str,
    help: &str,
    shards: &[Arc<ShardMetrics>],
    pick: impl Fn(&ShardMetrics) -> &Histogram,
) {
    let hs: Vec<&Histogram> = shards.iter().map(|s| pick(s)).collect();
    histogram_of(w, name, help, &hs);
}

fn histogram_of(w: &mut String, name: &str, help: &str, hs: &[&Histogram]) {
    header(w, name, "histogram", help);
    let mut cumulative = 0;
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += hs.iter().map(|h| h.buckets[i].get()).sum::<u64>();
        let _ = writeln!(w, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let count: u64 = hs.iter().map(|h| h.count.get()).sum();
    let sum_ns: u64 = hs.iter().map(|h| h.sum_ns.get()).sum();
    let _ = writeln!(w, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(w, "{name}_sum {:.6}", sum_ns as f64 / 1e9);
    let _ = writeln!(w, "{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    #[test]
    fn scrape_merges_shards() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.generated_tokens.add(3);
        b.generated_tokens.add(4);
        b.handshake_failure("bad_version");
        a.ttft.observe(Duration::from_millis(3));
        let r = Registry {
            shards: vec![a, b],
            engine: Arc::default(),
            io_driver: vec![OnceLock::from("io_uring"), OnceLock::from("io_uring")],
            model: "null".into(),
            instance_id: "a\"b".into(),
            store: None,
            compression: None,
            tenants: Default::default(),
        };
        let text = r.render();
        assert!(
            text.contains("seedance_generated_tokens_total 7\n"),
            "{text}"
        );
        assert!(text.contains("seedance_handshake_failures_total{reason=\"bad_version\"} 1\n"));
        assert!(text.contains("seedance_io_driver{driver=\"io_uring\"} 2\n"));
        assert!(
            text.contains("seedance_instance_info{instance_id=\"a\\\"b\",model=\"null\""),
            "{text}"
        );
        assert!(text.contains("seedance_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("seedance_time_to_first_token_seconds_count 1\n"));
    }
}
