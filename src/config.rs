//! Configuration: built-in defaults < YAML file (`--config`) < `SEEDANCE_*` env < flags.
//!
//! Every key exists once, in the [`keys!`] table below, which generates the command-line
//! flags (with their env names and defaults in `--help`), the YAML file schema (unknown keys are
//! an error) and the resolved [`Settings`]. The per-layer structs ([`ServerConfig`],
//! [`SessionConfig`], [`EngineConfig`]) are cut from `Settings` once and validated there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// Which protocols the listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// WebSocket (`GET /v1/chat`) plus the plain HTTP routes.
    Websocket,
    /// HTTP only (OpenAI-compatible routes, health, metrics).
    Http,
    /// Both on one port.
    All,
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// Largest credit window or window credit (RFC 7540's flow-control limit, for the same reason:
/// it fits an i32 on every client).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Defines every configuration key once: `name: Type = default, "ENV_NAME", "help"`.
macro_rules! keys {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr, $env:literal; )*) => {
        /// Command-line flags; every field is also a YAML key and a `SEEDANCE_*` variable.
        #[derive(Parser, Debug, Default)]
        #[command(name = "seedance-server", version, about = "Streaming LLM inference server")]
        pub struct Cli {
            /// YAML configuration file (keys as below, snake_case).
            #[arg(long, env = "SEEDANCE_CONFIG")]
            pub config: Option<PathBuf>,
            /// Print the resolved configuration as YAML and exit.
            #[arg(long)]
            pub print_config: bool,
            $( $(#[$doc])* #[arg(long, env = $env, help_heading = "Settings",
                 long_help = None, default_value = None)]
               pub $name: Option<$ty>, )*
            #[command(subcommand)]
            pub command: Option<Command>,
        }

        /// The YAML file: the same keys, all optional; unknown keys are an error.
        #[derive(Deserialize, Debug, Default)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            $( $name: Option<$ty>, )*
        }

        /// Every key resolved.
        #[derive(Serialize, Debug, Clone)]
        pub struct Settings {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl Settings {
            fn layer(mut self, cli: &Cli, file: FileConfig) -> Self {
                $( if let Some(v) = file.$name { self.$name = v; } )*
                $( if let Some(v) = &cli.$name { self.$name = v.clone(); } )*
                self
            }

            /// (key, default) pairs, for docs/configuration.md and `--help`.
            pub fn defaults_table() -> Vec<(&'static str, String)> {
                let d = Settings::default();
                vec![ $( (stringify!($name), format!("{:?}", d.$name)), )* ]
            }
        }
    };
}

keys! {
    /// Address every shard listens on (SO_REUSEPORT).
    listen: String = "127.0.0.1:8080".into(), "SEEDANCE_LISTEN";
    /// Address of the TLS listener (every shard, beside `listen`); empty = no TLS. Needs
    /// `tls_cert` and `tls_key`.
    tls_listen: String = String::new(), "SEEDANCE_TLS_LISTEN";
    /// PEM file with the certificate chain, leaf first (reloaded on SIGHUP).
    tls_cert: String = String::new(), "SEEDANCE_TLS_CERT";
    /// PEM file with the private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1; reloaded on SIGHUP).
    tls_key: String = String::new(), "SEEDANCE_TLS_KEY";
    /// Also offer TLS 1.2 (TLS 1.3 only by default).
    tls12: bool = false, "SEEDANCE_TLS12";
    /// File of session-ticket keys shared by the instances behind one load balancer (one key
    /// per line, 64 hex digits; the first seals, all open; reloaded on SIGHUP); empty =
    /// per-process keys.
    tls_ticket_keys: String = String::new(), "SEEDANCE_TLS_TICKET_KEYS";
    /// YAML file of tenants (ids, SHA-256 of their API keys, allowed models, rate and
    /// concurrency limits; docs/configuration.md "Tenants"); empty = authentication off.
    tenants_file: String = String::new(), "SEEDANCE_TENANTS_FILE";
    /// Protocols served: websocket, http or all.
    mode: Mode = Mode::All, "SEEDANCE_MODE";
    /// Network shards (one pinned monoio runtime each); 0 = all cores minus the engine's.
    cores: usize = 0, "SEEDANCE_CORES";
    /// Model: `default` (SmolLM2-135M-Instruct from the cache scripts/fetch_model.sh fills, else synthetic:tiny), a checkpoint directory, a `.gguf` file, `synthetic:<shape>`, or `null` (fixed text, no weights).
    model: String = "default".into(), "SEEDANCE_MODEL";
    /// Name the model is served as (X-Model-ID, "model" fields); empty = derived from --model.
    served_model_name: String = String::new(), "SEEDANCE_SERVED_MODEL_NAME";
    /// auto, cpu or cuda (auto: CUDA when a driver and device answer, else CPU).
    device: Device = Device::Auto, "SEEDANCE_DEVICE";
    /// Redis URL of the state store (resume on any instance sharing it); empty = embedded
    /// in-memory store (resume on this instance).
    redis_url: String = String::new(), "SEEDANCE_REDIS_URL";
    /// Redis Cluster nodes of the state store, comma-separated URLs (any of its masters or
    /// replicas; the rest is discovered); excludes `redis_url`. Needs Redis 7+.
    redis_cluster: String = String::new(), "SEEDANCE_REDIS_CLUSTER";
    /// How long a failing Redis Cluster call is retried (reconnecting, reading the slot map
    /// again) before the store counts as unavailable; set it above the cluster's
    /// `cluster-node-timeout` plus a failover election. Meanwhile live streams go on and store
    /// writes wait.
    redis_retry_ms: u64 = 10_000, "SEEDANCE_REDIS_RETRY_MS";
    /// Log WebSocket generations so a client can resume them after a dropped connection.
    resume: bool = true, "SEEDANCE_RESUME";
    /// How long a generation runs on after its client left, waiting for a resume.
    resume_grace_ms: u64 = 60_000, "SEEDANCE_RESUME_GRACE_MS";
    /// How long a log outlives its last write.
    resume_ttl_ms: u64 = 600_000, "SEEDANCE_RESUME_TTL_MS";
    /// Lease of an owner on its generations; a resume after it expired takes the generation over.
    lease_ms: u64 = 5_000, "SEEDANCE_LEASE_MS";
    /// Capacity of each shard's queue to the state thread (a full queue makes streams not resumable).
    store_queue_capacity: usize = 65_536, "SEEDANCE_STORE_QUEUE_CAPACITY";
    /// Memory the embedded store may hold, in MiB (oldest logs evicted first).
    memory_store_max_mb: usize = 512, "SEEDANCE_MEMORY_STORE_MAX_MB";
    /// How often the instances sharing a store (Redis) exchange their tenants' usage, so that
    /// tenant limits hold across all of them (overshooting by at most what the others admit in
    /// one interval); 0 = each instance enforces the limits alone.
    tenant_sync_ms: u64 = 250, "SEEDANCE_TENANT_SYNC_MS";
    /// This instance's name in the store and logs; empty = <hostname>-<pid>.
    instance_id: String = String::new(), "SEEDANCE_INSTANCE_ID";
    /// Null model pace per sequence; 0 = as fast as possible.
    null_tokens_per_s: f64 = 0.0, "SEEDANCE_NULL_TOKENS_PER_S";
    /// Largest HTTP request head (request line + headers); larger is 431.
    max_head_bytes: usize = 16 * 1024, "SEEDANCE_MAX_HEAD_BYTES";
    /// Largest HTTP request body; larger is 413.
    max_body_bytes: usize = 4 * 1024 * 1024, "SEEDANCE_MAX_BODY_BYTES";
    /// Largest WebSocket frame payload accepted; larger closes with 1009.
    max_frame_bytes: usize = 1024 * 1024, "SEEDANCE_MAX_FRAME_BYTES";
    /// Largest reassembled WebSocket message; larger closes with 1009.
    max_message_bytes: usize = 4 * 1024 * 1024, "SEEDANCE_MAX_MESSAGE_BYTES";
    /// Time allowed for a complete request head / WebSocket handshake (slow-loris guard).
    handshake_timeout_ms: u64 = 10_000, "SEEDANCE_HANDSHAKE_TIMEOUT_MS";
    /// A connection with no request in flight and no traffic for this long is closed.
    idle_timeout_ms: u64 = 300_000, "SEEDANCE_IDLE_TIMEOUT_MS";
    /// Interval between server PINGs (RTT samples).
    heartbeat_interval_ms: u64 = 15_000, "SEEDANCE_HEARTBEAT_INTERVAL_MS";
    /// A PONG overdue by this many RTOs marks the peer dead.
    heartbeat_dead_rtos: u32 = 4, "SEEDANCE_HEARTBEAT_DEAD_RTOS";
    /// Connections one shard accepts before answering 503.
    max_connections_per_core: usize = 65_536, "SEEDANCE_MAX_CONNECTIONS_PER_CORE";
    /// Connections one client address may hold open at once (whole instance); 0 = no limit
    /// (the default: behind a load balancer every client has its address).
    max_connections_per_ip: u32 = 0, "SEEDANCE_MAX_CONNECTIONS_PER_IP";
    /// New connections per second one client address may open (a burst of one second's worth);
    /// 0 = no limit.
    connection_rate_per_ip: u32 = 0, "SEEDANCE_CONNECTION_RATE_PER_IP";
    /// Concurrent generations on one WebSocket connection.
    max_requests_per_connection: usize = 64, "SEEDANCE_MAX_REQUESTS_PER_CONNECTION";
    /// Outgoing bytes queued on a connection above which its sequences pause in the engine.
    max_send_backlog_bytes: usize = 256 * 1024, "SEEDANCE_MAX_SEND_BACKLOG_BYTES";
    /// A connection whose sequences stay paused (its client reads nothing) this long is
    /// disconnected: its generations end, or run on into the log when resumable.
    max_pause_ms: u64 = 60_000, "SEEDANCE_MAX_PAUSE_MS";
    /// Credit window (bytes) of a WebSocket client that opts in with `?flow_control=credit`
    /// without a size; also the `window` the `session` message states.
    initial_window: u32 = 65_536, "SEEDANCE_INITIAL_WINDOW";
    /// Smallest credit window a client may ask for (`?initial_window=`).
    min_window: u32 = 1024, "SEEDANCE_MIN_WINDOW";
    /// How often messages held in the coalescing tier are flushed (credit 8–64 KiB; or a send
    /// backlog within 64 KiB of its bound: the wait before the next write), in 10 ms steps.
    throttle_delay_ms: u64 = 10, "SEEDANCE_THROTTLE_DELAY_MS";
    /// Grant compression to WebSocket clients that ask for it (`X-Compression: zstd`, or a
    /// permessage-deflate offer); off: every connection gets plain frames.
    compression: bool = true, "SEEDANCE_COMPRESSION";
    /// Accept permessage-deflate offers (RFC 7692; browsers send one by default).
    permessage_deflate: bool = true, "SEEDANCE_PERMESSAGE_DEFLATE";
    /// Memory all compression contexts (zstd and deflate) together may take, in MiB; past it,
    /// connections send plain frames and new ones are not granted compression.
    compression_budget_mb: usize = 256, "SEEDANCE_COMPRESSION_BUDGET_MB";
    /// Window bits of our permessage-deflate compressor (9..=15; a client's
    /// `server_max_window_bits` may lower it).
    deflate_window_bits: u8 = 12, "SEEDANCE_DEFLATE_WINDOW_BITS";
    /// zstd window log of every connection's stream (10..=20; the hash and chain logs follow it).
    zstd_window_log: u32 = 12, "SEEDANCE_ZSTD_WINDOW_LOG";
    /// Shard CPU load (0..1) under which zstd runs at level 9; up to `zstd_load_heavy` level 3, then 1.
    zstd_load_light: f64 = 0.5, "SEEDANCE_ZSTD_LOAD_LIGHT";
    /// Shard CPU load from which zstd runs at level 1.
    zstd_load_heavy: f64 = 0.8, "SEEDANCE_ZSTD_LOAD_HEAVY";
    /// Shard CPU load from which messages go out plain (circuit breaker); above 1 disables it.
    zstd_load_breaker: f64 = 0.95, "SEEDANCE_ZSTD_LOAD_BREAKER";
    /// Capacity of each shard → engine request queue.
    request_queue_capacity: usize = 4096, "SEEDANCE_REQUEST_QUEUE_CAPACITY";
    /// Capacity of each engine → shard event queue (a full queue pauses generation).
    event_queue_capacity: usize = 65_536, "SEEDANCE_EVENT_QUEUE_CAPACITY";
    /// Sequences the engine runs at once; more are refused as `overloaded`.
    max_running: usize = 256, "SEEDANCE_MAX_RUNNING";
    /// Requests waiting for admission before new ones are refused (429 / `overloaded`).
    max_waiting: usize = 1024, "SEEDANCE_MAX_WAITING";
    /// Tokens per engine step (decodes + prefill chunks): bounds how long a long prompt can
    /// delay running streams.
    max_num_batched_tokens: usize = 512, "SEEDANCE_MAX_NUM_BATCHED_TOKENS";
    /// Memory for the paged KV cache, in MiB.
    kv_cache_mb: usize = 1024, "SEEDANCE_KV_CACHE_MB";
    /// Tokens per KV block.
    kv_block_size: usize = 16, "SEEDANCE_KV_BLOCK_SIZE";
    /// Longest sequence (prompt + output); 0 = the model's max_position_embeddings.
    max_model_len: usize = 0, "SEEDANCE_MAX_MODEL_LEN";
    /// Threads of the CPU backend; 0 = one per available core.
    cpu_threads: usize = 0, "SEEDANCE_CPU_THREADS";
    /// Seed of synthetic models' random weights.
    synthetic_seed: u64 = 0, "SEEDANCE_SYNTHETIC_SEED";
    /// Default max_tokens when a request gives none.
    default_max_tokens: u32 = 256, "SEEDANCE_DEFAULT_MAX_TOKENS";
    /// Upper bound on max_tokens.
    max_tokens_limit: u32 = 32_768, "SEEDANCE_MAX_TOKENS_LIMIT";
    /// Time given to running generations on SIGTERM/SIGINT before exit.
    shutdown_timeout_ms: u64 = 10_000, "SEEDANCE_SHUTDOWN_TIMEOUT_MS";
    /// After SIGTERM, how long the instance goes on accepting while `/ready` answers 503, so a
    /// balancer with active health checks takes it out of the pool before its listener closes
    /// (0: close at once; a balancer without health checks sees connections refused and
    /// retries another instance).
    drain_delay_ms: u64 = 0, "SEEDANCE_DRAIN_DELAY_MS";
    /// Log filter (tracing EnvFilter syntax).
    log: String = "info".into(), "SEEDANCE_LOG";
}

/// Sub-commands besides serving.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Run the engine alone on one prompt and print the generated text (or ids) to stdout.
    Generate(crate::model::generate::GenerateArgs),
    /// Print the token ids of each TEXT (a JSON array per line), as the server encodes them.
    Tokenize(TokenizeArgs),
}

/// Flags of `seedance-server tokenize`.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// Checkpoint directory, .gguf file or synthetic:<shape>.
    #[arg(long)]
    pub model: String,
    /// Add what the tokenizer adds around a text (BOS where the checkpoint adds it).
    #[arg(long)]
    pub add_special: bool,
    /// Texts to encode.
    pub texts: Vec<String>,
}

/// Network layer: listener, shards, HTTP limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The TLS listener and its settings, when TLS is on.
    pub tls: Option<(SocketAddr, crate::server::tls::TlsSettings)>,
    /// The tenants file, when authentication is on.
    pub tenants_file: Option<std::path::PathBuf>,
    pub mode: Mode,
    pub cores: usize,
    pub max_head_bytes: usize,
    pub max_body_bytes: usize,
    pub max_connections_per_core: usize,
    pub max_connections_per_ip: u32,
    pub connection_rate_per_ip: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub drain_delay: Duration,
}

/// Per-connection session layer: WebSocket limits, heartbeat, request limits.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_dead_rtos: u32,
    pub max_requests_per_connection: usize,
    pub max_send_backlog_bytes: usize,
    pub max_pause: Duration,
    pub initial_window: u32,
    pub min_window: u32,
    pub throttle_delay: Duration,
    pub compression: CompressionConfig,
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
}

/// zstd and permessage-deflate for WebSocket clients that ask (SPEC 4 "Compression").
#[derive(Clone, Copy, Debug)]
pub struct CompressionConfig {
    pub enabled: bool,
    pub deflate: bool,
    pub budget_bytes: usize,
    pub window_log: u32,
    pub deflate_window_bits: u8,
    pub load_light: f64,
    pub load_heavy: f64,
    pub load_breaker: f64,
}

/// Resumable streams: the state store, leases, grace.
#[derive(Clone, Debug)]
pub struct ResumeConfig {
    pub enabled: bool,
    pub redis_url: String,
    /// Redis Cluster seed nodes (empty: not a cluster).
    pub redis_cluster: Vec<String>,
    pub redis_retry: Duration,
    pub grace: Duration,
    pub ttl: Duration,
    pub lease: Duration,
    pub queue_capacity: usize,
    pub memory_max_bytes: usize,
    pub instance_id: String,
    /// `None`: tenants' limits are per instance.
    pub tenant_sync: Option<Duration>,
}

/// Engine thread: model, device, queues.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model: String,
    /// Said at start-up: why `default` became what it did.
    pub model_note: Option<String>,
    pub served_model_name: String,
    pub device: Device,
    pub null_tokens_per_s: f64,
    pub request_queue_capacity: usize,
    pub event_queue_capacity: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_num_batched_tokens: usize,
    pub kv_cache_bytes: usize,
    pub kv_block_size: usize,
    pub max_model_len: usize,
    pub cpu_threads: usize,
    pub synthetic_seed: u64,
}

/// Everything the server needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub engine: EngineConfig,
    pub resume: ResumeConfig,
    pub settings: Settings,
}

/// A configuration problem, reported as one line at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// `<hostname>-<pid>`: unique among the instances sharing a store.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "seedance".into());
    format!("{host}-{}", std::process::id())
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Config {
    /// Resolves file + env + flags (already parsed into `cli`).
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            None => FileConfig::default(),
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: name.clone(),
                    source,
                })?;
                if text.trim().is_empty() {
                    FileConfig::default()
                } else {
                    serde_yaml::from_str(&text)
                        .map_err(|source| ConfigError::Parse { path: name, source })?
                }
            }
        };
        Config::from_settings(Settings::default().layer(cli, file))
    }

    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let listen: SocketAddr = s
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?}: {e}", s.listen)))?;
        let tls = if s.tls_listen.is_empty() {
            None
        } else {
            let addr: SocketAddr = s
                .tls_listen
                .parse()
                .map_err(|e| invalid("tls_listen", format!("{:?}: {e}", s.tls_listen)))?;
            if s.tls_cert.is_empty() || s.tls_key.is_empty() {
                return Err(invalid("tls_listen", "needs tls_cert and tls_key"));
            }
            Some((
                addr,
                crate::server::tls::TlsSettings {
                    cert: s.tls_cert.clone().into(),
                    key: s.tls_key.clone().into(),
                    tls12: s.tls12,
                    ticket_keys: (!s.tls_ticket_keys.is_empty())
                        .then(|| s.tls_ticket_keys.clone().into()),
                },
            ))
        };
        let cores = if s.cores == 0 {
            default_cores()
        } else {
            s.cores
        };
        if cores > 1024 {
            return Err(invalid("cores", "at most 1024"));
        }
        if s.max_head_bytes < 256 {
            return Err(invalid("max_head_bytes", "at least 256"));
        }
        if s.max_frame_bytes < 125 || s.max_message_bytes < s.max_frame_bytes {
            return Err(invalid(
                "max_message_bytes",
                "max_frame_bytes must be ≥ 125 and ≤ max_message_bytes",
            ));
        }
        if s.min_window < 1024 || s.initial_window < s.min_window || s.initial_window > MAX_WINDOW {
            return Err(invalid(
                "initial_window",
                "need 1024 ≤ min_window ≤ initial_window ≤ 2^31-1",
            ));
        }
        if !(10..=20).contains(&s.zstd_window_log) {
            return Err(invalid("zstd_window_log", "must be in 10..=20"));
        }
        if !(9..=15).contains(&s.deflate_window_bits) {
            return Err(invalid("deflate_window_bits", "must be in 9..=15"));
        }
        let loads = [s.zstd_load_light, s.zstd_load_heavy, s.zstd_load_breaker];
        if loads.iter().any(|l| !l.is_finite() || *l < 0.0)
            || loads[0] > loads[1]
            || loads[1] > loads[2]
        {
            return Err(invalid(
                "zstd_load_heavy",
                "need 0 ≤ zstd_load_light ≤ zstd_load_heavy ≤ zstd_load_breaker",
            ));
        }
        if s.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be > 0"));
        }
        if !s.redis_url.is_empty() && !s.redis_cluster.trim().is_empty() {
            return Err(invalid(
                "redis_cluster",
                "give either redis_url (one Redis) or redis_cluster, not both",
            ));
        }
        if !(s.null_tokens_per_s >= 0.0 && s.null_tokens_per_s.is_finite()) {
            return Err(invalid("null_tokens_per_s", "must be ≥ 0"));
        }
        if s.request_queue_capacity == 0 || s.event_queue_capacity < 16 {
            return Err(invalid(
                "event_queue_capacity",
                "queues must hold at least 16 events",
            ));
        }
        if s.default_max_tokens == 0 || s.default_max_tokens > s.max_tokens_limit {
            return Err(invalid(
                "default_max_tokens",
                "must be in 1..=max_tokens_limit",
            ));
        }
        let (model, model_note) = resolve_model(&s.model);
        let served_model_name = if s.served_model_name.is_empty() {
            derive_model_name(&model)
        } else {
            s.served_model_name.clone()
        };
        let ms = Duration::from_millis;
        Ok(Config {
            server: ServerConfig {
                listen,
                tls,
                tenants_file: (!s.tenants_file.is_empty()).then(|| s.tenants_file.clone().into()),
                mode: s.mode,
                cores,
                max_head_bytes: s.max_head_bytes,
                max_body_bytes: s.max_body_bytes,
                max_connections_per_core: s.max_connections_per_core,
                max_connections_per_ip: s.max_connections_per_ip,
                connection_rate_per_ip: s.connection_rate_per_ip,
                handshake_timeout: ms(s.handshake_timeout_ms),
                idle_timeout: ms(s.idle_timeout_ms),
                shutdown_timeout: ms(s.shutdown_timeout_ms),
                drain_delay: ms(s.drain_delay_ms),
            },
            session: SessionConfig {
                max_frame_bytes: s.max_frame_bytes,
                max_message_bytes: s.max_message_bytes,
                heartbeat_interval: ms(s.heartbeat_interval_ms),
                heartbeat_dead_rtos: s.heartbeat_dead_rtos.max(1),
                max_requests_per_connection: s.max_requests_per_connection.max(1),
                max_send_backlog_bytes: s.max_send_backlog_bytes.max(4096),
                max_pause: ms(s.max_pause_ms.max(100)),
                initial_window: s.initial_window,
                min_window: s.min_window,
                throttle_delay: ms(s.throttle_delay_ms.max(10)),
                compression: CompressionConfig {
                    enabled: s.compression,
                    deflate: s.compression && s.permessage_deflate,
                    budget_bytes: s.compression_budget_mb << 20,
                    window_log: s.zstd_window_log,
                    deflate_window_bits: s.deflate_window_bits,
                    load_light: s.zstd_load_light,
                    load_heavy: s.zstd_load_heavy,
                    load_breaker: s.zstd_load_breaker,
                },
                default_max_tokens: s.default_max_tokens,
                max_tokens_limit: s.max_tokens_limit,
            },
            engine: EngineConfig {
                model,
                model_note,
                served_model_name,
                device: s.device,
                null_tokens_per_s: s.null_tokens_per_s,
                request_queue_capacity: s.request_queue_capacity,
                event_queue_capacity: s.event_queue_capacity,
                max_running: s.max_running.max(1),
                max_waiting: s.max_waiting.max(1),
                max_num_batched_tokens: s.max_num_batched_tokens.max(1),
                kv_cache_bytes: s.kv_cache_mb.max(1) << 20,
                kv_block_size: s.kv_block_size.clamp(1, 1024),
                max_model_len: s.max_model_len,
                cpu_threads: s.cpu_threads,
                synthetic_seed: s.synthetic_seed,
            },
            resume: ResumeConfig {
                enabled: s.resume,
                redis_url: s.redis_url.clone(),
                redis_cluster: s
                    .redis_cluster
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect(),
                redis_retry: ms(s.redis_retry_ms),
                grace: ms(s.resume_grace_ms),
                ttl: ms(s.resume_ttl_ms.max(1_000)),
                lease: ms(s.lease_ms.max(100)),
                queue_capacity: s.store_queue_capacity.max(16),
                memory_max_bytes: s.memory_store_max_mb.max(1) << 20,
                tenant_sync: (s.tenant_sync_ms > 0).then(|| ms(s.tenant_sync_ms.max(20))),
                instance_id: if s.instance_id.is_empty() {
                    default_instance_id()
                } else {
                    s.instance_id.clone()
                },
            },
            settings: s,
        })
    }

    /// The resolved configuration as YAML (for `--print-config`).
    pub fn to_yaml(&self) -> String {
        let mut s = self.settings.clone();
        s.cores = self.server.cores;
        s.served_model_name = self.engine.served_model_name.clone();
        serde_yaml::to_string(&s).unwrap_or_default()
    }
}

/// All cores minus one for the engine thread, at least one.
fn default_cores() -> usize {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    n.saturating_sub(1).max(1)
}

/// The file `--model default` serves when it is there (scripts/fetch_model.sh puts it there).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model is looked for: `$SEEDANCE_CACHE_DIR/models`, else
/// `$XDG_CACHE_HOME/seedance/models`, else `~/.cache/seedance/models`.
pub fn model_cache_dir() -> Option<std::path::PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = env("SEEDANCE_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| env("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("seedance")))
        .or_else(|| env("HOME").map(|h| std::path::Path::new(&h).join(".cache/seedance")))?;
    Some(base.join("models"))
}

/// `default` → the cached default model, or `synthetic:tiny` with a note saying why.
fn resolve_model(spec: &str) -> (String, Option<String>) {
    if spec != "default" {
        return (spec.to_string(), None);
    }
    let dir = model_cache_dir();
    let file = dir.as_ref().map(|d| d.join(DEFAULT_MODEL_FILE));
    if let Some(f) = file.filter(|f| f.is_file()) {
        let note = format!("default model: {}", f.display());
        return (f.to_string_lossy().into_owned(), Some(note));
    }
    let place = dir.map_or("the cache (no HOME)".into(), |d| d.display().to_string());
    let note = format!(
        "default model {DEFAULT_MODEL_FILE} not found in {place} (bash scripts/fetch_model.sh fetches it): serving synthetic:tiny, random weights"
    );
    ("synthetic:tiny".into(), Some(note))
}

/// The served name of a model spec: `null`, `synthetic-<shape>`, or the checkpoint directory's
/// last component, restricted to the model-id alphabet of SPEC 4.
pub fn derive_model_name(model: &str) -> String {
    let raw = if let Some(shape) = model.strip_prefix("synthetic:") {
        format!("synthetic-{shape}")
    } else {
        let trimmed = model.trim_end_matches('/');
        let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
        last.strip_suffix(".gguf").unwrap_or(last).to_string()
    };
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while name.len() < 3 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["seedance-server"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("flags parse")
    }

    #[test]
    fn flags_win_over_file() {
        let dir = std::env::temp_dir().join(format!("seedance-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.yaml");
        std::fs::write(&path, "listen: 127.0.0.1:9000\ncores: 3\nmodel: null\n").expect("write");
        let p = path.to_str().expect("utf8 path");
        let c = Config::load(&cli(&["--config", p, "--cores", "2"])).expect("config");
        assert_eq!(c.server.cores, 2);
        assert_eq!(c.server.listen.port(), 9000);
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("seedance-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.yaml");
        std::fs::write(&path, "listne: 127.0.0.1:9000\n").expect("write");
        let p = path.to_str().expect("utf8 path");
        let err = Config::load(&cli(&["--config", p])).expect_err("must fail");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        let err = Config::load(&cli(&["--listen", "nowhere"])).expect_err("must fail");
        assert!(err.to_string().starts_with("invalid listen"), "{err}");
    }

    #[test]
    fn model_names_follow_the_id_alphabet() {
        assert_eq!(derive_model_name("null"), "null");
        assert_eq!(
            derive_model_name("synthetic:qwen2.5-0.5b"),
            "synthetic-qwen2.5-0.5b"
        );
        assert_eq!(derive_model_name("/models/Llama 3/"), "Llama-3");
    }
}

#[cfg(test)]
mod doc_tests {
    use super::Settings;

    #[test]
    fn configuration_doc_lists_every_key() {
        let doc = include_str!("../docs/configuration.md");
        for (key, _) in Settings::defaults_table() {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "docs/configuration.md lacks {key}"
            );
        }
    }
}
