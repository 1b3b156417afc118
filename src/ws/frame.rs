//! Frame headers (RFC 6455 §5.2): check, then parse; and encode.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! ```
//!
//! [`parse_header`] rejects every violation that the header alone shows,
//! before the payload is read or any memory is reserved for it.

use bytes::{BufMut, BytesMut};

use super::error::WsError;
use super::mask::apply_mask;

/// Longest possible header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER_LEN: usize = 14;
/// Largest control-frame payload (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// RSV1 in its first-byte position (permessage-deflate's "compressed" bit).
pub const RSV1: u8 = 0x40;
/// RSV2 in its first-byte position.
pub const RSV2: u8 = 0x20;
/// RSV3 in its first-byte position.
pub const RSV3: u8 = 0x10;

/// Frame opcodes (§5.2); the reserved ones are rejected by [`OpCode::from_u8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for a reserved one.
    #[inline]
    pub const fn from_u8(v: u8) -> Option<OpCode> {
        match v {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// Close, Ping and Pong: never fragmented, at most 125 bytes.
    #[inline]
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which end of the connection we are: decides which mask rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We accept connections: every incoming frame must be masked.
    Server,
    /// We opened the connection: no incoming frame may be masked.
    Client,
}

/// Size and extension limits for incoming frames, fixed per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single frame payload; bigger is refused from the header (1009).
    pub max_frame_size: u64,
    /// Largest message, summed over its fragments (1009). A prompt is text, so
    /// this bounds the memory one connection can make us buffer.
    pub max_message_size: u64,
    /// RSV bits (first-byte position, e.g. [`RSV1`]) an extension negotiated
    /// at handshake allows on data frames; 0 without extensions
    /// (`Decoder::with_deflate` sets RSV1 for permessage-deflate).
    pub allowed_rsv: u8,
}

impl Limits {
    /// Default frame and message limit: 16 MiB.
    pub const DEFAULT_MAX_SIZE: u64 = 16 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: Self::DEFAULT_MAX_SIZE,
            max_message_size: Self::DEFAULT_MAX_SIZE,
            allowed_rsv: 0,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of its message.
    pub fin: bool,
    /// RSV bits in first-byte position (a subset of `Limits::allowed_rsv`).
    pub rsv: u8,
    pub opcode: OpCode,
    /// Masking key, present exactly when the peer is a client.
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes of header before the payload (2–14).
    pub header_len: usize,
}

/// Parses and checks the frame header at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed. Errors are the violations visible in
/// the header: reserved bits or opcodes, a fragmented or oversized control
/// frame, a mask that does not match `role`, a 64-bit length with its top bit
/// set, a payload over `limits.max_frame_size`. Non-minimal length encodings
/// are accepted (RFC 6455 does not forbid them for receivers).
pub fn parse_header(
    buf: &[u8],
    role: Role,
    limits: &Limits,
) -> Result<Option<FrameHeader>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = b0 & (RSV1 | RSV2 | RSV3);
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(WsError::ReservedOpcode(b0 & 0x0f))?;
    // No extension defines RSV bits on control frames (RFC 7692 §6.1 forbids RSV1 there).
    let allowed = if opcode.is_control() {
        0
    } else {
        limits.allowed_rsv
    };
    if rsv & !allowed != 0 {
        return Err(WsError::ReservedBits(rsv));
    }
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlTooLong(u64::from(len7)));
        }
    }
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(WsError::UnmaskedFrame),
        (Role::Client, true) => return Err(WsError::MaskedFrame),
        _ => {}
    }

    let ext_len = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext_len + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(None);
    }
    let payload_len = match ext_len {
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WsError::LengthMsbSet);
            }
            len
        }
        _ => u64::from(len7),
    };
    if payload_len > limits.max_frame_size {
        return Err(WsError::FrameTooBig {
            len: payload_len,
            limit: limits.max_frame_size,
        });
    }
    let mask = if masked {
        let k = 2 + ext_len;
        Some([buf[k], buf[k + 1], buf[k + 2], buf[k + 3]])
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// Encodes a header (RSV bits clear) with the minimal length encoding into
/// `dst`, returning how many bytes were written (2–14). For vectored writes:
/// header from the stack, payload from its own `Bytes`.
#[inline]
pub fn encode_header(
    dst: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    dst[0] = (u8::from(fin) << 7) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if payload_len < 126 {
        dst[1] = mask_bit | payload_len as u8;
        2
    } else if let Ok(len) = u16::try_from(payload_len) {
        dst[1] = mask_bit | 126;
        dst[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        dst[1] = mask_bit | 127;
        dst[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        dst[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    n
}

/// Appends one complete, unmasked frame (server to client).
#[inline]
pub fn write_frame(dst: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    write_fragment(dst, true, opcode, payload, None);
}

/// Appends one complete frame masked with `key` (client to server). The
/// caller picks `key`; RFC 6455 §5.3 wants it unpredictable for browsers'
/// sake, which does not matter for our own load generator.
#[inline]
pub fn write_frame_masked(dst: &mut BytesMut, opcode: OpCode, payload: &[u8], key: [u8; 4]) {
    write_fragment(dst, true, opcode, payload, Some(key));
}

/// Appends one complete, unmasked frame with RSV bits (first-byte position) set, e.g. RSV1
/// for a permessage-deflate message.
pub fn write_frame_rsv(dst: &mut BytesMut, rsv: u8, opcode: OpCode, payload: &[u8]) {
    let start = dst.len();
    write_fragment(dst, true, opcode, payload, None);
    dst[start] |= rsv & (RSV1 | RSV2 | RSV3);
}

/// Appends one frame with explicit FIN and optional mask: the building block
/// for fragmented messages.
pub fn write_fragment(
    dst: &mut BytesMut,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut header, fin, opcode, payload.len() as u64, mask);
    dst.reserve(n + payload.len());
    dst.put_slice(&header[..n]);
    let start = dst.len();
    dst.put_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut dst[start..], key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn server(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
        parse_header(buf, Role::Server, &Limits::default())
    }

    fn client(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
        parse_header(buf, Role::Client, &Limits::default())
    }

    #[test]
    fn rfc_unmasked_hello() {
        let frame = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = client(&frame).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, h.header_len),
            (true, OpCode::Text, None, 5, 2)
        );
        let mut out = BytesMut::new();
        write_frame(&mut out, OpCode::Text, b"Hello");
        assert_eq!(&out[..], &frame);
    }

    #[test]
    fn rfc_masked_hello() {
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = server(&frame).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, h.header_len),
            (true, OpCode::Text, Some(KEY), 5, 6)
        );
        let mut out = BytesMut::new();
        write_frame_masked(&mut out, OpCode::Text, b"Hello", KEY);
        assert_eq!(&out[..], &frame);
    }

    #[test]
    fn rfc_fragmented_hello() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        let second = [0x80, 0x02, 0x6c, 0x6f];
        let h = client(&first).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len), (false, OpCode::Text, 3));
        let h = client(&second).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len),
            (true, OpCode::Continuation, 2)
        );
        let mut out = BytesMut::new();
        write_fragment(&mut out, false, OpCode::Text, b"Hel", None);
        write_fragment(&mut out, true, OpCode::Continuation, b"lo", None);
        assert_eq!(&out[..], &[&first[..], &second[..]].concat()[..]);
    }

    #[test]
    fn rfc_ping_and_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = client(&ping).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len), (OpCode::Ping, 5));
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = server(&pong).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.payload_len, h.mask),
            (OpCode::Pong, 5, Some(KEY))
        );
    }

    #[test]
    fn rfc_256_bytes_and_64k_lengths() {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut hdr, true, OpCode::Binary, 256, None);
        assert_eq!(&hdr[..n], &[0x82, 0x7e, 0x01, 0x00]);
        assert_eq!(client(&hdr[..n]).unwrap().unwrap().payload_len, 256);

        let n = encode_header(&mut hdr, true, OpCode::Binary, 65536, None);
        assert_eq!(&hdr[..n], &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(client(&hdr[..n]).unwrap().unwrap().payload_len, 65536);

        // Boundaries of the three encodings.
        for (len, expect) in [(125u64, 2usize), (126, 4), (65535, 4), (65536, 10)] {
            assert_eq!(
                encode_header(&mut hdr, true, OpCode::Text, len, None),
                expect
            );
            assert_eq!(
                encode_header(&mut hdr, true, OpCode::Text, len, Some(KEY)),
                expect + 4
            );
        }
    }

    #[test]
    fn needs_more_bytes() {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut hdr, true, OpCode::Binary, 70000, Some(KEY));
        assert_eq!(n, 14);
        for cut in 0..n {
            assert_eq!(server(&hdr[..cut]), Ok(None), "cut {cut}");
        }
        assert!(server(&hdr[..n]).unwrap().is_some());
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        let h = client(&[0x82, 0x7e, 0x00, 0x05]).unwrap().unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 4));
        let h = client(&[0x82, 0x7f, 0, 0, 0, 0, 0, 0, 0, 5])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 10));
    }

    #[test]
    fn violations() {
        // Reserved bits, with and without an extension allowing RSV1.
        for rsv in [RSV1, RSV2, RSV3, RSV1 | RSV3] {
            assert_eq!(
                server(&[0x81 | rsv, 0x80, 0, 0, 0, 0]),
                Err(WsError::ReservedBits(rsv))
            );
        }
        let deflate = Limits {
            allowed_rsv: RSV1,
            ..Limits::default()
        };
        assert!(
            parse_header(&[0xc1, 0x80, 0, 0, 0, 0], Role::Server, &deflate)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            parse_header(&[0xa1, 0x80, 0, 0, 0, 0], Role::Server, &deflate),
            Err(WsError::ReservedBits(RSV2))
        );
        // ... but never on control frames.
        assert_eq!(
            parse_header(&[0xc9, 0x80, 0, 0, 0, 0], Role::Server, &deflate),
            Err(WsError::ReservedBits(RSV1))
        );

        // Reserved opcodes.
        for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
            assert_eq!(server(&[0x80 | op, 0x80]), Err(WsError::ReservedOpcode(op)));
        }
        // Control frames: fragmented, too long (126 and 127 length markers too).
        assert_eq!(server(&[0x09, 0x80]), Err(WsError::FragmentedControl));
        assert_eq!(
            server(&[0x88, 0xfe, 0x00, 0x7e]),
            Err(WsError::ControlTooLong(126))
        );
        assert_eq!(server(&[0x8a, 0xff]), Err(WsError::ControlTooLong(127)));
        assert!(server(&[0x89, 0xfd, 0, 0, 0, 0]).unwrap().is_some()); // 125 is fine
                                                                       // Masking by role.
        assert_eq!(server(&[0x81, 0x05]), Err(WsError::UnmaskedFrame));
        assert_eq!(client(&[0x81, 0x85]), Err(WsError::MaskedFrame));
        // 64-bit length with the top bit set.
        assert_eq!(
            client(&[0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::LengthMsbSet)
        );
        // Too big for the limit.
        let small = Limits {
            max_frame_size: 100,
            ..Limits::default()
        };
        assert_eq!(
            parse_header(&[0x82, 0x7e, 0x00, 0x65], Role::Client, &small),
            Err(WsError::FrameTooBig {
                len: 101,
                limit: 100
            })
        );
        assert!(parse_header(&[0x82, 0x64], Role::Client, &small)
            .unwrap()
            .is_some());
        // Every violation maps to its close code.
        assert_eq!(
            server(&[0x83, 0x80]).unwrap_err().close_code().as_u16(),
            1002
        );
        assert_eq!(
            parse_header(&[0x82, 0x7e, 0x00, 0x65], Role::Client, &small)
                .unwrap_err()
                .close_code()
                .as_u16(),
            1009
        );
    }

    #[test]
    fn opcode_values() {
        for v in 0u8..16 {
            match OpCode::from_u8(v) {
                Some(op) => {
                    assert_eq!(op as u8, v);
                    assert_eq!(op.is_control(), v >= 8);
                }
                None => assert!(matches!(v, 3..=7 | 0xb..=0xf)),
            }
        }
    }

    proptest! {
        #[test]
        fn fuzz_parse_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20),
                                          server_role in any::<bool>(), rsv in any::<u8>(),
                                          max in any::<u64>()) {
            let role = if server_role { Role::Server } else { Role::Client };
            let limits = Limits { max_frame_size: max, max_message_size: max, allowed_rsv: rsv };
            if let Ok(Some(h)) = parse_header(&bytes, role, &limits) {
                prop_assert!(h.header_len <= bytes.len());
                prop_assert!(h.payload_len <= max);
            }
        }

        #[test]
        fn fuzz_header_round_trip(fin in any::<bool>(), op in prop::sample::select(vec![0u8, 1, 2]),
                                  len in prop_oneof![0u64..300, 60000u64..70000, 0u64..(1 << 40)],
                                  key in any::<Option<[u8; 4]>>()) {
            let opcode = OpCode::from_u8(op).unwrap();
            let mut hdr = [0u8; MAX_HEADER_LEN];
            let n = encode_header(&mut hdr, fin, opcode, len, key);
            let role = if key.is_some() { Role::Server } else { Role::Client };
            let limits = Limits { max_frame_size: u64::MAX, ..Limits::default() };
            let h = parse_header(&hdr[..n], role, &limits).unwrap().unwrap();
            prop_assert_eq!(h, FrameHeader { fin, rsv: 0, opcode, mask: key, payload_len: len, header_len: n });
        }
    }
}
