//! seedance: a streaming LLM inference server.
//!
//! # Layout (in data-path order)
//! - [`config`]   file + env + flags → `ServerConfig`, `SessionConfig`, `EngineConfig`
//! - [`server`]   start-up, one pinned monoio runtime per core (`shard`), one task per
//!   connection (`conn`), its output queue and writer (`out`), signals (`shutdown`)
//! - [`http`]     request heads parsed in place, routes, error table, the upgrade hand-off
//! - [`ws`]       RFC 6455: handshake, frames, masking, close codes, UTF-8, message decoder
//! - [`session`]  above the frames: state machine, JSON protocol, heartbeat, per-request
//!   streaming (detokenize → chunk → frame)
//! - [`store`]    the state store (embedded or Redis) behind the state thread: logs, leases,
//!   resume and takeover
//! - [`engine`]   the boundary queues, the engine thread loop, the generators (null model,
//!   runner), the paged KV cache (`kv`), the forward pass on CPU or GPU (`forward`)
//! - [`model`]    checkpoint config and loading, the Llama-family transformer, synthetic models
//! - [`backend`]  the compute ops behind the transformer (`Backend` trait; `cpu` implementation)
//!   and `cuda`: kernels, launchers, the device-resident model the GPU serves from
//! - [`client`]   seedance-client: a WebSocket client that reconnects, resumes and acks
//! - [`metrics`]  every metric, per shard, merged at scrape

pub mod backend;
pub mod client;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod model;
pub mod server;
pub mod session;
pub mod store;
pub mod ws;
