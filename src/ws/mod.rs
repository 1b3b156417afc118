//! The WebSocket protocol layer (RFC 6455): pure functions and small state
//! machines over byte buffers, no I/O. The connection code owns the socket and
//! the read buffer; this layer says what the bytes mean.
//!
//! Data path, in order:
//! - [`handshake`]: validate the upgrade request (key, version, model, stream
//!   mode, compression, tenant and key) and write the `101` or a JSON error;
//!   [`tenant`] holds the hashed keys, [`fields`] reads headers and query.
//! - [`frame`]: check, then parse a frame header; encode headers and frames.
//! - [`mask`]: unmask payloads in place, a word at a time.
//! - [`codec`]: [`Decoder`] turns the read buffer into [`Message`]s,
//!   zero-copy for single-frame messages, reassembling fragments, validating
//!   text incrementally with [`utf8`].
//! - [`deflate`]: permessage-deflate (RFC 7692) negotiation and bounded inflating
//!   (the decoder inflates messages sent with RSV1).
//! - [`reject`]: handshake refusals and their HTTP responses.
//! - [`close`]: close codes and close payloads; [`error`]: every protocol
//!   violation with its close code and metric label.
//!
//! Both roles are supported: [`Role::Server`] for the server, [`Role::Client`]
//! for our load generator and client library.

pub mod close;
pub mod codec;
pub mod deflate;
pub mod error;
pub mod fields;
pub mod frame;
#[cfg(test)]
mod fuzz;
pub mod handshake;
pub mod mask;
pub mod reject;
pub mod tenant;
pub mod utf8;

pub use close::{write_close_frame, CloseCode};
pub use codec::{encode_message, Decoder, Message};
pub use error::WsError;
pub use frame::{
    encode_header, parse_header, write_fragment, write_frame, write_frame_masked, FrameHeader,
    Limits, OpCode, Role,
};
pub use handshake::{
    validate, write_error_response, write_response_101, Accepted, Compression, HandshakeContext,
    HandshakeError, HandshakeRequest, StreamMode,
};
pub use mask::{apply_mask, apply_mask_offset};
pub use tenant::{Tenant, Tenants};
pub use utf8::Utf8Validator;
