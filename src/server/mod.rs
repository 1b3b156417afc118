//! Start-up and the thread layout: one engine thread, `cores` shard threads (each a pinned
//! monoio runtime with its own `SO_REUSEPORT` listener), one signal thread.

pub mod conn;
pub mod io;
pub mod notify;
pub mod out;
pub mod shard;
pub mod shutdown;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;

use slab::Slab;

use crate::config::Config;
use crate::engine::queue::{self, ShardLink};
use crate::metrics::{EngineMetrics, Registry, ShardMetrics};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::thread::{self, StoreHandle};
use crate::store::{StateStore, Ttls};
use shard::{Shard, Shared};

/// Why the server could not start (printed as one line, exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shard {shard}: {source}")]
    Runtime {
        shard: usize,
        source: std::io::Error,
    },
    #[error("model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error("cannot spawn thread: {0}")]
    Thread(std::io::Error),
    #[error("state store {url}: {reason}")]
    Store { url: String, reason: String },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("tenants file {path}: {reason}")]
    Tenants { path: String, reason: String },
}

/// A running server (for tests and the binary).
pub struct Server {
    pub addr: SocketAddr,
    /// The TLS listener's address, when TLS is on.
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shards: Vec<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
    engine_stop: Arc<AtomicBool>,
    state: Option<JoinHandle<()>>,
}

impl Server {
    /// Asks every shard to stop accepting and drain (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
    }

    /// A handle that starts the drain from another thread (the signal thread).
    pub fn stopper(&self) -> Arc<dyn Fn() + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || shared.shutdown.store(true, Ordering::Release))
    }

    /// A handle that reloads the TLS certificate and ticket keys and the tenants file (what
    /// SIGHUP does); open connections keep what they negotiated, running requests the tenant
    /// they were admitted under.
    pub fn reloader(&self) -> Arc<dyn Fn() + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || {
            match shared.tls.as_ref().map(|t| t.reload()) {
                None => {}
                Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate and ticket keys reloaded"),
                Some(Err(e)) => {
                    tracing::warn!("SIGHUP: TLS reload failed, keeping the old ones: {e}")
                }
            }
            if let Some(path) = &shared.config.server.tenants_file {
                match shared.tenants.reload(path) {
                    Ok(n) => tracing::info!("SIGHUP: {n} tenants reloaded from {}", path.display()),
                    Err(e) => tracing::warn!(
                        "SIGHUP: tenants file {} not reloaded, keeping the current tenants: {e}",
                        path.display()
                    ),
                }
            }
            if shared.tls.is_none() && shared.config.server.tenants_file.is_none() {
                tracing::info!("SIGHUP: no TLS listener and no tenants file, nothing to reload");
            }
        })
    }

    /// Waits until every shard has drained, then stops the engine.
    pub fn join(mut self) {
        for h in self.shards.drain(..) {
            let _ = h.join();
        }
        // The shards' last writes and releases are queued: flush them, then stop.
        if let Some(store) = &self.shared.store {
            store.stop();
        }
        if let Some(s) = self.state.take() {
            let _ = s.join();
        }
        self.engine_stop.store(true, Ordering::Release);
        if let Some(e) = self.engine.take() {
            e.thread().unpark();
            let _ = e.join();
        }
    }
}

/// CPUs this process may run on (respects `taskset` / cgroup cpusets).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Starts the engine and every shard; returns once every shard accepts connections.
/// The state thread's handle and join handle (both `None` when resume is off).
type StoreStart = (Option<Arc<StoreHandle>>, Option<JoinHandle<()>>);

/// Opens the state store (first: an unreachable Redis fails start-up before the model loads).
fn start_store(config: &Config, shards: usize) -> Result<StoreStart, StartError> {
    let r = &config.resume;
    if !r.enabled {
        return Ok((None, None));
    }
    let ttls = Ttls {
        log: r.ttl,
        lease: r.lease,
    };
    let store: Box<dyn StateStore> = if !r.redis_cluster.is_empty() {
        let s =
            RedisStore::connect_cluster(&r.redis_cluster, ttls, r.redis_retry).map_err(|e| {
                StartError::Store {
                    url: r.redis_cluster.join(","),
                    reason: e.to_string(),
                }
            })?;
        Box::new(s)
    } else if r.redis_url.is_empty() {
        Box::new(MemoryStore::new(ttls, r.memory_max_bytes))
    } else {
        let s = RedisStore::connect(&r.redis_url, ttls).map_err(|e| StartError::Store {
            url: r.redis_url.clone(),
            reason: e.to_string(),
        })?;
        Box::new(s)
    };
    tracing::info!(
        store = store.kind(),
        instance = r.instance_id,
        "resumable streams on (grace {:?}, lease {:?})",
        r.grace,
        r.lease
    );
    let (h, j) = thread::spawn(
        store,
        shards,
        r.queue_capacity,
        r.instance_id.as_str().into(),
    )
    .map_err(StartError::Thread)?;
    Ok((Some(h), Some(j)))
}

pub fn start(config: Config) -> Result<Server, StartError> {
    let (store, state) = start_store(&config, config.server.cores)?;
    let engine_metrics = Arc::new(EngineMetrics::default());
    let built =
        crate::engine::build::build(&config.engine, engine_metrics.clone()).map_err(|reason| {
            StartError::Model {
                model: config.engine.model.clone(),
                reason,
            }
        })?;
    let generator = built.generator;
    let n = config.server.cores;
    let cpus = allowed_cpus();
    let (shard_links, engine_links, parker) = queue::links(
        n,
        config.engine.request_queue_capacity,
        config.engine.event_queue_capacity,
    );
    let shard_metrics: Vec<Arc<ShardMetrics>> = (0..n).map(|_| Arc::default()).collect();
    let compression = Arc::new(crate::session::compress::Budget::new(
        &config.session.compression,
    ));
    tracing::debug!(
        context_bytes = compression.ctx_bytes,
        window_log = compression.window_log,
        "zstd context size (ZSTD_sizeof_CCtx)"
    );
    let tenants = match &config.server.tenants_file {
        None => crate::ws::tenant::Tenants::default(),
        Some(path) => {
            crate::ws::tenant::Tenants::load(path).map_err(|reason| StartError::Tenants {
                path: path.display().to_string(),
                reason,
            })?
        }
    };
    let tenants = Arc::new(crate::ws::tenant::TenantTable::new(tenants));
    if let (Some(st), Some(every)) = (store.as_ref(), config.resume.tenant_sync) {
        if st.shared && !tenants.current().is_empty() {
            let _ = st.tenant_sync.set((tenants.clone(), every));
        }
    }
    let registry = Arc::new(Registry {
        shards: shard_metrics.clone(),
        engine: engine_metrics,
        io_driver: (0..n).map(|_| OnceLock::new()).collect(),
        model: config.engine.served_model_name.clone(),
        instance_id: config.resume.instance_id.clone(),
        store: store.clone(),
        compression: Some(compression.clone()),
        tenants: tenants.clone(),
    });
    let tls = match &config.server.tls {
        Some((_, settings)) => Some(Arc::new(tls::Tls::load(settings)?)),
        None => None,
    };
    let ip_limits = crate::session::limits::IpLimits::new(
        config.server.max_connections_per_ip,
        config.server.connection_rate_per_ip,
    );
    let shared = Arc::new(Shared {
        tls,
        ip_limits,
        models: vec![config.engine.served_model_name.clone()],
        codec: built.codec,
        max_model_len: built.max_model_len,
        registry,
        ready: AtomicBool::new(false),
        shutdown: AtomicBool::new(false),
        tenants,
        store,
        compression,
        config,
    });
    let engine_stop = Arc::new(AtomicBool::new(false));
    let engine = {
        let stop = engine_stop.clone();
        let engine_cpu = (built.pin_engine && n < cpus.len()).then(|| cpus[n]);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _in = span.entered();
                if let Some(cpu) = engine_cpu {
                    let _ = monoio::utils::bind_to_cpu_set([cpu]);
                }
                crate::engine::thread::run(generator, engine_links, parker, stop)
            })
            .map_err(StartError::Thread)?
    };
    let mut addr = shared.config.server.listen;
    let mut tls_addr = shared.config.server.tls.as_ref().map(|(a, _)| *a);
    let mut handles = Vec::with_capacity(n);
    for (i, link) in shard_links.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let cpu = cpus.get(i % cpus.len().max(1)).copied();
        let h = spawn_shard(
            i,
            cpu,
            (addr, tls_addr),
            link,
            shared.clone(),
            shard_metrics[i].clone(),
            tx,
        )?;
        handles.push(h);
        match rx.recv() {
            // Later shards bind the ports the first one got (`:0` resolved once).
            Ok(Ok((bound, tls_bound))) => {
                addr = bound;
                tls_addr = tls_bound;
            }
            Ok(Err(e)) => {
                shared.shutdown.store(true, Ordering::Release);
                return Err(e);
            }
            Err(_) => {
                return Err(StartError::Runtime {
                    shard: i,
                    source: std::io::Error::other("shard thread died"),
                })
            }
        }
    }
    shared.ready.store(true, Ordering::Release);
    Ok(Server {
        addr,
        tls_addr,
        shared,
        shards: handles,
        engine: Some(engine),
        engine_stop,
        state,
    })
}

/// Addresses a shard listens on: plain, and TLS when configured.
type Addrs = (SocketAddr, Option<SocketAddr>);

fn spawn_shard(
    i: usize,
    cpu: Option<usize>,
    (addr, tls_addr): Addrs,
    link: ShardLink,
    shared: Arc<Shared>,
    metrics: Arc<ShardMetrics>,
    ready: mpsc::Sender<Result<Addrs, StartError>>,
) -> Result<JoinHandle<()>, StartError> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(format!("shard-{i}"))
        .spawn(move || {
            let _in = span.entered();
            if let Some(cpu) = cpu {
                if monoio::utils::bind_to_cpu_set([cpu]).is_err() {
                    tracing::warn!(shard = i, cpu, "could not pin shard to its core");
                }
            }
            let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .with_entries(4096)
                .build();
            let mut rt = match rt {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = ready.send(Err(StartError::Runtime { shard: i, source }));
                    return;
                }
            };
            rt.block_on(async move {
                let driver = if monoio::utils::is_legacy() {
                    "epoll"
                } else {
                    "io_uring"
                };
                let _ = shared.registry.io_driver[i].set(driver);
                let listener = match shard::bind(addr) {
                    Ok(l) => l,
                    Err(source) => {
                        let _ = ready.send(Err(StartError::Bind { addr, source }));
                        return;
                    }
                };
                let bound = listener.local_addr().unwrap_or(addr);
                let tls_listener = match tls_addr.map(shard::bind) {
                    None => None,
                    Some(Ok(l)) => Some(l),
                    Some(Err(source)) => {
                        let addr = tls_addr.unwrap_or(addr);
                        let _ = ready.send(Err(StartError::Bind { addr, source }));
                        return;
                    }
                };
                let tls_bound = tls_listener
                    .as_ref()
                    .map(|l| l.local_addr().unwrap_or(bound));
                tracing::info!(shard = i, cpu = ?cpu, driver, tls = ?tls_bound, "shard accepting on {bound}");
                let shard = Rc::new(Shard {
                    id: i as u16,
                    shared,
                    metrics,
                    link: RefCell::new(link),
                    conns: RefCell::new(Slab::new()),
                    requests: RefCell::new(Slab::new()),
                    slot_gens: RefCell::new(Vec::new()),
                    dirty: RefCell::new(Vec::new()),
                    backlog: RefCell::new(Vec::new()),
                    epoch: std::time::Instant::now(),
                    accept_cancel: RefCell::new(monoio::io::Canceller::new()),
                    draining: Cell::new(false),
                    shutdown_seen: Cell::new(None),
                    journal: Default::default(),
                    throttled: RefCell::new(Vec::new()),
                    zstd_level: Cell::new(Some(9)),
                    pools: Default::default(),
                    cpu_sample: Cell::new((std::time::Instant::now(), shard::thread_cpu_time())),
                });
                let _ = ready.send(Ok((bound, tls_bound)));
                shard::run(shard, listener, tls_listener).await;
            });
        })
        .map_err(StartError::Thread)
}
