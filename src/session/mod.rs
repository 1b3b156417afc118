//! The session layer: what a WebSocket connection means above the frames — the state machine,
//! the JSON protocol, heartbeats, per-request streaming (detokenize, chunk, frame).

pub mod chunker;
pub mod codec;
pub mod heartbeat;
pub mod json;
pub mod logprobs;
pub mod protocol;
pub mod request;
pub mod request_http;
pub mod state;
pub mod ws;
