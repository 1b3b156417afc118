//! The session layer: what a WebSocket connection means above the frames — the state machine,
//! the JSON protocol, heartbeats, per-request streaming (detokenize, chunk, frame), the shard's side of the log (`journal`)
//! and `resume`.

pub mod chunker;
pub mod codec;
pub mod compress;
pub mod flow;
pub mod heartbeat;
pub mod journal;
pub mod json;
pub mod limits;
pub mod logprobs;
pub mod protocol;
pub mod request;
pub mod request_http;
pub mod resume;
pub mod resume_http;
pub mod state;
pub mod ws;
