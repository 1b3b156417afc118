//! HTTP/1.1 on the shared port: request heads parsed in place (`httparse`), bodies bounded,
//! keep-alive and pipelining, the plain routes, and the hand-off to the WebSocket upgrade.
//!
//! Why not monoio-http: its 0.3 codec has no upgrade API, writes `content-length: 0` on a `101`
//! (RFC 9110 §8.6 forbids it) and pulls tokio and rustls 0.21 into a server that uses neither;
//! a head parser over our own buffer is a few hundred lines and keeps the buffer ours.

pub mod conn;
pub mod error;
pub mod openai;
pub mod request;
pub mod response;
pub mod responses;
pub mod routes;
pub mod sse;
