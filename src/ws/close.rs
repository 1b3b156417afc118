//! Close frames (RFC 6455 §5.5.1, §7.4): status codes and the close payload.
//!
//! A close payload is empty, or a 2-byte big-endian status code followed by a
//! UTF-8 reason; the whole payload is a control-frame payload, so at most 125
//! bytes and the reason at most 123.

use std::fmt;

use bytes::{BufMut, BytesMut};

use super::error::WsError;
use super::frame::{write_fragment, OpCode};

/// Longest reason that fits in a control frame after the 2-byte code.
pub const MAX_REASON_LEN: usize = 123;

/// A WebSocket close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// Server shutting down or client navigating away.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// The peer broke the framing protocol.
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    /// A data type the endpoint cannot accept (e.g. binary where only text is).
    pub const UNSUPPORTED: CloseCode = CloseCode(1003);
    /// Reserved: "no status code present"; never sent on the wire.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// Reserved: "closed without a close frame"; never sent on the wire.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// Data inconsistent with the message type (invalid UTF-8 in text).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// A message that violates the endpoint's policy.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// A frame or message larger than the endpoint accepts.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// (Client) the server did not negotiate a required extension.
    pub const EXTENSION: CloseCode = CloseCode(1010);
    /// (Server) an unexpected condition prevented fulfilling the request.
    pub const INTERNAL: CloseCode = CloseCode(1011);
    /// Service restarting (IANA registry).
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// Temporary overload, try again later (IANA registry).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// Gateway received an invalid upstream response (IANA registry).
    pub const BAD_GATEWAY: CloseCode = CloseCode(1014);
    /// Reserved: TLS handshake failure; never sent on the wire.
    pub const TLS_HANDSHAKE: CloseCode = CloseCode(1015);

    /// The numeric code.
    #[inline]
    pub const fn as_u16(self) -> u16 {
        self.0
    }

    /// Whether this code may appear in a close frame; see [`is_valid_on_wire`].
    #[inline]
    pub const fn is_valid_on_wire(self) -> bool {
        is_valid_on_wire(self.0)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether `code` may be sent in a close frame (RFC 6455 §7.4 and the IANA
/// registry): 1000–1003 and 1007–1014 are defined; 1004 is reserved, 1005,
/// 1006 and 1015 are for local use only; the rest of 0–2999 is unassigned;
/// 3000–3999 (registered) and 4000–4999 (private) are allowed.
#[inline]
pub const fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses a close frame's (already unmasked) payload.
///
/// `Ok(None)` for an empty payload (no status). A 1-byte payload, or a code not
/// valid on the wire, is a protocol error (1002); a reason that is not UTF-8 is
/// [`WsError::InvalidCloseReason`] (1007).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(CloseCode, &str)>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::CloseOneByte),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_on_wire(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Some((CloseCode(code), reason)))
        }
    }
}

/// Appends a close payload (code + reason) to `dst`. The reason is cut at a
/// character boundary to fit [`MAX_REASON_LEN`].
pub fn encode_close_payload(dst: &mut BytesMut, code: CloseCode, reason: &str) {
    let reason = truncate_reason(reason);
    dst.reserve(2 + reason.len());
    dst.put_u16(code.0);
    dst.put_slice(reason.as_bytes());
}

/// Writes a close payload into a fixed buffer (for building a frame without
/// a temporary `BytesMut`), returning its length.
pub fn close_payload_into(dst: &mut [u8; 125], code: CloseCode, reason: &str) -> usize {
    let reason = truncate_reason(reason);
    dst[..2].copy_from_slice(&code.0.to_be_bytes());
    dst[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    2 + reason.len()
}

/// Appends a whole close frame (code + reason, masked when `mask` is given):
/// what a connection sends to fail with [`WsError::close_code`] or to say
/// goodbye with [`CloseCode::GOING_AWAY`].
pub fn write_close_frame(dst: &mut BytesMut, code: CloseCode, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = [0u8; 125];
    let n = close_payload_into(&mut payload, code, reason);
    write_fragment(dst, true, OpCode::Close, &payload[..n], mask);
}

/// The longest prefix of `reason` that fits in a close frame and ends on a
/// character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_table() {
        for code in 0..=u16::MAX {
            let expected = [1000, 1001, 1002, 1003].contains(&code)
                || (1007..=1014).contains(&code)
                || (3000..=4999).contains(&code);
            assert_eq!(is_valid_on_wire(code), expected, "code {code}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
        for good in [
            1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(good).is_valid_on_wire(), "{good}");
        }
    }

    #[test]
    fn parse_empty_and_code_only() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(
            parse_close_payload(&[0x03, 0xe8]),
            Ok(Some((CloseCode::NORMAL, "")))
        );
    }

    #[test]
    fn parse_with_reason() {
        let mut payload = vec![0x03, 0xe9];
        payload.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            parse_close_payload(&payload),
            Ok(Some((CloseCode::GOING_AWAY, "bye ✓")))
        );
    }

    #[test]
    fn one_byte_payload_is_protocol_error() {
        let err = parse_close_payload(&[0x03]).unwrap_err();
        assert_eq!(err, WsError::CloseOneByte);
        assert_eq!(err.close_code(), CloseCode::PROTOCOL);
    }

    #[test]
    fn invalid_codes_are_protocol_errors() {
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let err = parse_close_payload(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err, WsError::InvalidCloseCode(code));
            assert_eq!(err.close_code(), CloseCode::PROTOCOL);
        }
    }

    #[test]
    fn bad_reason_utf8_is_1007() {
        let err = parse_close_payload(&[0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd]).unwrap_err();
        assert_eq!(err, WsError::InvalidCloseReason);
        assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn encode_round_trips() {
        let mut dst = BytesMut::new();
        encode_close_payload(&mut dst, CloseCode::TOO_BIG, "too big");
        assert_eq!(&dst[..], b"\x03\xf1too big");
        assert_eq!(
            parse_close_payload(&dst),
            Ok(Some((CloseCode::TOO_BIG, "too big")))
        );
    }

    #[test]
    fn close_frame_bytes() {
        let mut dst = BytesMut::new();
        let err = WsError::InvalidUtf8;
        write_close_frame(&mut dst, err.close_code(), err.label(), None);
        assert_eq!(&dst[..], b"\x88\x0e\x03\xefinvalid_utf8");
        dst.clear();
        write_close_frame(
            &mut dst,
            CloseCode::GOING_AWAY,
            &"x".repeat(200),
            Some([1, 2, 3, 4]),
        );
        assert_eq!(&dst[..2], &[0x88, 0xfd]); // 125 bytes, masked
    }

    #[test]
    fn long_reason_is_truncated_on_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes, 2 bytes per char
        let mut dst = BytesMut::new();
        encode_close_payload(&mut dst, CloseCode::NORMAL, &reason);
        assert_eq!(dst.len(), 2 + 122);
        assert!(parse_close_payload(&dst).is_ok());

        let mut fixed = [0u8; 125];
        let n = close_payload_into(&mut fixed, CloseCode::NORMAL, &"x".repeat(500));
        assert_eq!(n, 125);
        assert!(parse_close_payload(&fixed[..n]).is_ok());
    }
}
