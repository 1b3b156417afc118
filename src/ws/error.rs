//! `WsError`: every way a peer can break the framing protocol, with the close
//! code to fail the connection with (RFC 6455 §7.4.1) and a metric label.

use super::close::CloseCode;

/// A WebSocket protocol violation found while decoding. After any of these the
/// connection must be failed: send a close frame with [`WsError::close_code`]
/// and stop reading (the decoder's state is unspecified afterwards).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// RSV bits set that no negotiated extension allows (bits in first-byte position).
    #[error("reserved bits {0:#04x} set without a negotiated extension")]
    ReservedBits(u8),
    /// Opcode 3–7 or 0xB–0xF.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// A server received a frame without a mask.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A client received a masked frame.
    #[error("server frame is masked")]
    MaskedFrame,
    /// 64-bit extended length with the most significant bit set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
    /// One frame larger than `Limits::max_frame_size`.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    FrameTooBig { len: u64, limit: u64 },
    /// A (possibly fragmented) message larger than `Limits::max_message_size`.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    MessageTooBig { len: u64, limit: u64 },
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A text message that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// A close frame with a 1-byte payload.
    #[error("close frame payload of 1 byte")]
    CloseOneByte,
    /// A close frame whose status code may not be sent on the wire.
    #[error("close code {0} is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A close frame whose reason is not UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    /// A permessage-deflate message that does not inflate (corrupt or cut-short deflate data).
    #[error("compressed message does not inflate")]
    BadDeflate,
    /// RSV1 (compressed) on a continuation frame: only a message's first frame carries it.
    #[error("RSV1 set on a continuation frame")]
    CompressedContinuation,
}

impl WsError {
    /// The close code to fail the connection with: 1007 for bad UTF-8, 1009
    /// for size limits, 1002 for every other protocol violation.
    pub const fn close_code(&self) -> CloseCode {
        match self {
            WsError::InvalidUtf8 | WsError::InvalidCloseReason | WsError::BadDeflate => {
                CloseCode::INVALID_PAYLOAD
            }
            WsError::FrameTooBig { .. } | WsError::MessageTooBig { .. } => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL,
        }
    }

    /// A short, fixed label for metrics (`seedance_ws_protocol_errors_total{reason}`).
    pub const fn label(&self) -> &'static str {
        match self {
            WsError::ReservedBits(_) => "reserved_bits",
            WsError::ReservedOpcode(_) => "reserved_opcode",
            WsError::FragmentedControl => "fragmented_control",
            WsError::ControlTooLong(_) => "control_too_long",
            WsError::UnmaskedFrame => "unmasked_frame",
            WsError::MaskedFrame => "masked_frame",
            WsError::LengthMsbSet => "bad_length",
            WsError::FrameTooBig { .. } => "frame_too_big",
            WsError::MessageTooBig { .. } => "message_too_big",
            WsError::UnexpectedContinuation => "unexpected_continuation",
            WsError::ExpectedContinuation => "expected_continuation",
            WsError::InvalidUtf8 => "invalid_utf8",
            WsError::CloseOneByte => "bad_close_payload",
            WsError::InvalidCloseCode(_) => "bad_close_code",
            WsError::InvalidCloseReason => "bad_close_reason",
            WsError::BadDeflate => "bad_deflate",
            WsError::CompressedContinuation => "compressed_continuation",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_and_labels() {
        let cases = [
            (WsError::ReservedBits(0x40), 1002),
            (WsError::ReservedOpcode(3), 1002),
            (WsError::FragmentedControl, 1002),
            (WsError::ControlTooLong(126), 1002),
            (WsError::UnmaskedFrame, 1002),
            (WsError::MaskedFrame, 1002),
            (WsError::LengthMsbSet, 1002),
            (WsError::FrameTooBig { len: 2, limit: 1 }, 1009),
            (WsError::MessageTooBig { len: 2, limit: 1 }, 1009),
            (WsError::UnexpectedContinuation, 1002),
            (WsError::ExpectedContinuation, 1002),
            (WsError::InvalidUtf8, 1007),
            (WsError::CloseOneByte, 1002),
            (WsError::InvalidCloseCode(1005), 1002),
            (WsError::InvalidCloseReason, 1007),
            (WsError::BadDeflate, 1007),
            (WsError::CompressedContinuation, 1002),
        ];
        let mut labels = std::collections::HashSet::new();
        for (err, code) in cases {
            assert_eq!(err.close_code().as_u16(), code, "{err}");
            assert!(
                labels.insert(err.label()),
                "duplicate label {}",
                err.label()
            );
            assert!(!err.to_string().is_empty());
        }
    }
}
