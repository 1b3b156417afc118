//! `Decoder`: bytes from the socket → whole messages, zero-copy.
//!
//! A complete single-frame message is split off the read buffer, unmasked in
//! place and frozen: the returned `Bytes` is a slice of the read buffer, not a
//! copy. Only a fragmented message is copied, fragment by fragment, into one
//! `BytesMut` (the decoder's only allocation, made when the first fragment
//! arrives). Control frames may arrive between fragments and are returned at
//! once. Text is validated as it arrives, fragment by fragment and even within
//! a frame that is still being read, so invalid UTF-8 fails the connection
//! (1007) as soon as it is seen.

use bytes::{Buf, Bytes, BytesMut};

use super::close::{close_payload_into, parse_close_payload, CloseCode};
use super::deflate::Inflater;
use super::error::WsError;
use super::frame::{parse_header, write_fragment, FrameHeader, Limits, OpCode, Role, RSV1};
use super::mask::apply_mask_offset;
use super::utf8::Utf8Validator;

/// A complete message (or control frame) from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: `None` without a status, else the code and a UTF-8 reason.
    Close(Option<(CloseCode, Bytes)>),
}

impl Message {
    /// The opcode this message is sent with.
    pub const fn opcode(&self) -> OpCode {
        match self {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
            Message::Ping(_) => OpCode::Ping,
            Message::Pong(_) => OpCode::Pong,
            Message::Close(_) => OpCode::Close,
        }
    }
}

/// A frame whose header has been parsed but whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct Partial {
    header: FrameHeader,
    /// Payload bytes already unmasked (and UTF-8 checked, for text) in place.
    done: usize,
}

/// Per-connection decoding state. Small and allocation-free until a
/// fragmented message arrives.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    /// The frame at the front of the buffer, when its payload is incomplete.
    partial: Option<Partial>,
    /// Opcode (Text or Binary) of the fragmented message in progress.
    fragmented: Option<OpCode>,
    /// The fragments received so far of that message.
    fragments: BytesMut,
    /// UTF-8 state of the text message in progress.
    utf8: Utf8Validator,
    /// permessage-deflate, when negotiated: inflates messages sent with RSV1.
    inflater: Option<Inflater>,
    /// The message in progress is compressed (its text is checked once inflated).
    compressed: bool,
}

impl Decoder {
    /// A decoder for one connection; `role` is our side of it.
    pub fn new(role: Role, limits: Limits) -> Self {
        Decoder {
            role,
            limits,
            partial: None,
            fragmented: None,
            fragments: BytesMut::new(),
            utf8: Utf8Validator::new(),
            inflater: None,
            compressed: false,
        }
    }

    /// Accepts permessage-deflate messages (RSV1 on their first frame), inflating them within
    /// `limits.max_message_size`. `takeover`: the peer keeps its deflate window between
    /// messages (a server always asks clients not to).
    pub fn with_deflate(mut self, takeover: bool) -> Self {
        self.limits.allowed_rsv |= RSV1;
        self.inflater = Some(Inflater::new(takeover));
        self
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether a fragmented message is in progress.
    pub fn in_message(&self) -> bool {
        self.fragmented.is_some()
    }

    /// Decodes the next message from the front of `buf`, consuming its frames.
    ///
    /// `Ok(None)`: more bytes are needed; append them to the same `buf` (never
    /// remove or change bytes already in it) and call again. Call repeatedly
    /// until `Ok(None)`: one read may hold many messages. On `Err`, fail the
    /// connection with [`WsError::close_code`]; do not call again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            let partial = match self.partial.take() {
                Some(p) => p,
                None => match parse_header(buf, self.role, &self.limits)? {
                    None => return Ok(None),
                    Some(header) => {
                        self.begin_frame(&header)?;
                        Partial { header, done: 0 }
                    }
                },
            };
            let header = partial.header;
            let total = usize::try_from(header.payload_len)
                .ok()
                .and_then(|len| len.checked_add(header.header_len))
                .ok_or(WsError::FrameTooBig {
                    len: header.payload_len,
                    limit: self.limits.max_frame_size,
                })?;
            if buf.len() < total {
                self.partial = Some(self.progress(buf, partial)?);
                return Ok(None);
            }
            let mut payload = buf.split_to(total);
            payload.advance(header.header_len);
            self.unmask_and_check(&mut payload, &header, partial.done)?;
            if let Some(msg) = self.finish_frame(&header, payload)? {
                return Ok(Some(msg));
            }
        }
    }

    /// Message-level checks from the header, before the payload is read.
    fn begin_frame(&mut self, header: &FrameHeader) -> Result<(), WsError> {
        let rsv1 = header.rsv & RSV1 != 0;
        let so_far = match (header.opcode, self.fragmented) {
            (OpCode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
            (OpCode::Continuation, Some(_)) if rsv1 => return Err(WsError::CompressedContinuation),
            (OpCode::Continuation, Some(_)) => self.fragments.len() as u64,
            (OpCode::Text | OpCode::Binary, Some(_)) => return Err(WsError::ExpectedContinuation),
            (OpCode::Text | OpCode::Binary, None) => {
                if rsv1 && self.inflater.is_none() {
                    return Err(WsError::ReservedBits(RSV1));
                }
                self.compressed = rsv1;
                self.utf8.reset();
                0
            }
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => return Ok(()),
        };
        let len = so_far.saturating_add(header.payload_len);
        if len > self.limits.max_message_size {
            return Err(WsError::MessageTooBig {
                len,
                limit: self.limits.max_message_size,
            });
        }
        Ok(())
    }

    /// Whether `header`'s payload is (part of) a plain text message, checked as it arrives.
    fn is_text(&self, header: &FrameHeader) -> bool {
        if self.compressed && !header.opcode.is_control() {
            return false;
        }
        match header.opcode {
            OpCode::Text => true,
            OpCode::Continuation => self.fragmented == Some(OpCode::Text),
            _ => false,
        }
    }

    /// Unmasks and validates the part of a text payload that has arrived, so
    /// invalid UTF-8 is caught before the rest of the frame comes in.
    fn progress(&mut self, buf: &mut BytesMut, mut partial: Partial) -> Result<Partial, WsError> {
        if !self.is_text(&partial.header) {
            return Ok(partial);
        }
        // The frame is incomplete, so everything after the header is payload.
        let arrived = buf.len().saturating_sub(partial.header.header_len);
        if arrived > partial.done {
            let payload = &mut buf[partial.header.header_len..];
            self.unmask_and_check(payload, &partial.header, partial.done)?;
            partial.done = arrived;
        }
        Ok(partial)
    }

    /// Unmasks `payload[done..]` (key phase `done`) and feeds text to the validator.
    fn unmask_and_check(
        &mut self,
        payload: &mut [u8],
        header: &FrameHeader,
        done: usize,
    ) -> Result<(), WsError> {
        let fresh = payload.get_mut(done..).unwrap_or_default();
        if let Some(key) = header.mask {
            apply_mask_offset(fresh, key, done);
        }
        if self.is_text(header) {
            self.utf8.feed(fresh)?;
        }
        Ok(())
    }

    /// Turns a complete, unmasked frame into a message, or folds it into the
    /// fragmented message in progress.
    fn finish_frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Message>, WsError> {
        let opcode = match header.opcode {
            OpCode::Ping => return Ok(Some(Message::Ping(payload.freeze()))),
            OpCode::Pong => return Ok(Some(Message::Pong(payload.freeze()))),
            OpCode::Close => {
                let code = parse_close_payload(&payload)?.map(|(code, _)| code);
                let payload = payload.freeze();
                return Ok(Some(Message::Close(code.map(|c| (c, payload.slice(2..))))));
            }
            OpCode::Text | OpCode::Binary if header.fin => {
                return self.complete(header.opcode, payload).map(Some);
            }
            OpCode::Text | OpCode::Binary => {
                self.fragmented = Some(header.opcode);
                header.opcode
            }
            // `begin_frame` refused a continuation with no message in progress.
            OpCode::Continuation => self.fragmented.ok_or(WsError::UnexpectedContinuation)?,
        };
        self.fragments.extend_from_slice(&payload);
        if !header.fin {
            return Ok(None);
        }
        self.fragmented = None;
        let whole = self.fragments.split();
        self.complete(opcode, whole).map(Some)
    }

    /// A whole data message: inflated when compressed, its text checked.
    fn complete(&mut self, opcode: OpCode, payload: BytesMut) -> Result<Message, WsError> {
        if !self.compressed {
            if opcode == OpCode::Text {
                self.utf8.finish()?;
            }
            return Ok(data_message(opcode, payload.freeze()));
        }
        self.compressed = false;
        let inflater = self.inflater.as_mut().ok_or(WsError::ReservedBits(RSV1))?;
        let plain = inflater.inflate(&payload, self.limits.max_message_size)?;
        if opcode == OpCode::Text && std::str::from_utf8(&plain).is_err() {
            return Err(WsError::InvalidUtf8);
        }
        Ok(data_message(opcode, plain.freeze()))
    }
}

fn data_message(opcode: OpCode, payload: Bytes) -> Message {
    if opcode == OpCode::Text {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

/// Appends `msg` as one frame, masked with `mask` when given (client role).
/// A close reason that is not UTF-8 is dropped; a long one is truncated.
pub fn encode_message(dst: &mut BytesMut, msg: &Message, mask: Option<[u8; 4]>) {
    let (opcode, payload): (OpCode, &[u8]) = match msg {
        Message::Text(b) => (OpCode::Text, b),
        Message::Binary(b) => (OpCode::Binary, b),
        Message::Ping(b) => (OpCode::Ping, b),
        Message::Pong(b) => (OpCode::Pong, b),
        Message::Close(None) => (OpCode::Close, &[]),
        Message::Close(Some((code, reason))) => {
            let mut close = [0u8; 125];
            let reason = std::str::from_utf8(reason).unwrap_or_default();
            let n = close_payload_into(&mut close, *code, reason);
            write_fragment(dst, true, OpCode::Close, &close[..n], mask);
            return;
        }
    };
    write_fragment(dst, true, opcode, payload, mask);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::write_frame_masked;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn server() -> Decoder {
        Decoder::new(Role::Server, Limits::default())
    }

    /// Masked client frame with explicit FIN.
    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_fragment(&mut out, fin, opcode, payload, Some(KEY));
        out.to_vec()
    }

    fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, WsError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(msg) = dec.decode(&mut buf)? {
            out.push(msg);
        }
        Ok(out)
    }

    fn text(s: &str) -> Message {
        Message::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rfc_examples() {
        // Single-frame masked "Hello" to a server.
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode_all(&mut server(), &masked), Ok(vec![text("Hello")]));
        // Unmasked "Hello", fragmented "Hel" + "lo", ping: to a client.
        let mut client = Decoder::new(Role::Client, Limits::default());
        let bytes = [
            &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f][..],
            &[0x01, 0x03, 0x48, 0x65, 0x6c],
            &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
            &[0x80, 0x02, 0x6c, 0x6f],
        ]
        .concat();
        let ping = Message::Ping(Bytes::from_static(b"Hello"));
        assert_eq!(
            decode_all(&mut client, &bytes),
            Ok(vec![text("Hello"), ping, text("Hello")])
        );
        // 256 bytes and 64 KiB binary payloads.
        for len in [256usize, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let msgs = decode_all(&mut server(), &frame(true, OpCode::Binary, &payload)).unwrap();
            assert_eq!(msgs, vec![Message::Binary(payload.into())]);
        }
    }

    #[test]
    fn single_frame_is_zero_copy() {
        let mut buf = BytesMut::new();
        write_frame_masked(&mut buf, OpCode::Text, b"first message", KEY);
        write_frame_masked(&mut buf, OpCode::Binary, b"second", KEY);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let mut dec = server();
        for expected in [&b"first message"[..], b"second"] {
            let msg = dec.decode(&mut buf).unwrap().unwrap();
            let (Message::Text(b) | Message::Binary(b)) = msg else {
                panic!("{msg:?}")
            };
            assert_eq!(&b[..], expected);
            let p = b.as_ptr() as usize;
            assert!(p >= start && p + b.len() <= end, "payload was copied");
        }
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(
            dec.fragments.capacity(),
            0,
            "no allocation without fragments"
        );
    }

    #[test]
    fn decoder_is_small() {
        // Per-connection state for 10k+ connections: no heap, two cache lines (96 B today).
        assert!(
            std::mem::size_of::<Decoder>() <= 128,
            "{}",
            std::mem::size_of::<Decoder>()
        );
    }

    /// Also pins a bug found before the first commit: the still-arriving part of
    /// a text frame was unmasked at twice its key offset.
    #[test]
    fn byte_by_byte_feeding() {
        let bytes = [
            frame(false, OpCode::Text, "κό".as_bytes()),
            frame(true, OpCode::Ping, b"p"),
            frame(true, OpCode::Continuation, "σμε".as_bytes()),
        ]
        .concat();
        let mut dec = server();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(m) = dec.decode(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(
            got,
            vec![Message::Ping(Bytes::from_static(b"p")), text("κόσμε")]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn close_frames() {
        let mut dec = server();
        assert_eq!(
            decode_all(&mut dec, &frame(true, OpCode::Close, &[])),
            Ok(vec![Message::Close(None)])
        );
        assert_eq!(
            decode_all(&mut dec, &frame(true, OpCode::Close, b"\x03\xe8bye")),
            Ok(vec![Message::Close(Some((
                CloseCode::NORMAL,
                Bytes::from_static(b"bye")
            )))])
        );
        let cases: [(&[u8], WsError); 3] = [
            (b"\x03", WsError::CloseOneByte),
            (b"\x03\xed", WsError::InvalidCloseCode(1005)),
            (b"\x03\xe8\xff", WsError::InvalidCloseReason),
        ];
        for (payload, err) in cases {
            assert_eq!(
                decode_all(&mut server(), &frame(true, OpCode::Close, payload)),
                Err(err)
            );
        }
    }

    #[test]
    fn sequence_violations() {
        let cont = frame(true, OpCode::Continuation, b"x");
        let err = decode_all(&mut server(), &cont).unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code().as_u16()),
            (WsError::UnexpectedContinuation, 1002)
        );

        let bytes = [
            frame(false, OpCode::Text, b"a"),
            frame(true, OpCode::Binary, b"b"),
        ]
        .concat();
        let err = decode_all(&mut server(), &bytes).unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code().as_u16()),
            (WsError::ExpectedContinuation, 1002)
        );

        // Unmasked frame to a server, masked frame to a client.
        let err = decode_all(&mut server(), &[0x81, 0x00]).unwrap_err();
        assert_eq!(err.close_code().as_u16(), 1002);
        let mut client = Decoder::new(Role::Client, Limits::default());
        assert_eq!(
            decode_all(&mut client, &frame(true, OpCode::Text, b"x")),
            Err(WsError::MaskedFrame)
        );
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_frame_size: 10,
            max_message_size: 15,
            allowed_rsv: 0,
        };
        let mut dec = Decoder::new(Role::Server, limits);
        let err = decode_all(&mut dec, &frame(true, OpCode::Binary, &[0; 11])).unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code().as_u16()),
            (WsError::FrameTooBig { len: 11, limit: 10 }, 1009)
        );

        // Running total over fragments, refused from the header of the fragment that crosses it.
        let mut dec = Decoder::new(Role::Server, limits);
        let first = frame(false, OpCode::Binary, &[0; 10]);
        let second = frame(true, OpCode::Continuation, &[0; 6]);
        assert_eq!(decode_all(&mut dec, &first), Ok(vec![]));
        let err = dec.decode(&mut BytesMut::from(&second[..6])).unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code().as_u16()),
            (WsError::MessageTooBig { len: 16, limit: 15 }, 1009)
        );

        // Single frame over the message limit.
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 5,
            allowed_rsv: 0,
        };
        let err = decode_all(
            &mut Decoder::new(Role::Server, limits),
            &frame(true, OpCode::Text, b"123456"),
        );
        assert_eq!(err, Err(WsError::MessageTooBig { len: 6, limit: 5 }));
    }

    #[test]
    fn invalid_utf8_fails_fast_between_fragments() {
        // Autobahn 6.4.1: the invalid fragment is refused before the final one arrives.
        let mut dec = server();
        let mut buf = BytesMut::from(&frame(false, OpCode::Text, "κόσμε".as_bytes())[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&frame(false, OpCode::Continuation, &[0xf4, 0x90, 0x80, 0x80])[..]);
        let err = dec.decode(&mut buf).unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code().as_u16()),
            (WsError::InvalidUtf8, 1007)
        );
    }

    #[test]
    fn invalid_utf8_fails_fast_within_a_frame() {
        // Autobahn 6.4.3: one frame, invalid bytes in the middle, rest not yet sent.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
        payload.extend_from_slice(b"edited");
        let bytes = frame(true, OpCode::Text, &payload);
        let mut dec = server();
        let mut buf = BytesMut::from(&bytes[..6 + 10]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&bytes[16..19]); // ... b5 f4 90: F4 90 can start nothing
        assert_eq!(dec.decode(&mut buf), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn incomplete_code_point_at_message_end_is_1007() {
        let bytes = [
            frame(false, OpCode::Text, &[0xce]),
            frame(true, OpCode::Continuation, &[]),
        ]
        .concat();
        assert_eq!(decode_all(&mut server(), &bytes), Err(WsError::InvalidUtf8));
        assert_eq!(
            decode_all(
                &mut server(),
                &frame(true, OpCode::Text, &[b'a', 0xe2, 0x82])
            ),
            Err(WsError::InvalidUtf8)
        );
        // Binary is not validated.
        assert!(decode_all(&mut server(), &frame(true, OpCode::Binary, &[0xff])).is_ok());
    }

    #[test]
    fn encode_message_round_trip() {
        let msgs = vec![
            text("hi"),
            Message::Binary(Bytes::from_static(&[0, 1, 2])),
            Message::Ping(Bytes::from_static(b"t=1")),
            Message::Pong(Bytes::new()),
            Message::Close(Some((
                CloseCode::GOING_AWAY,
                Bytes::from_static(b"restart"),
            ))),
            Message::Close(None),
        ];
        let mut masked = BytesMut::new();
        let mut plain = BytesMut::new();
        for m in &msgs {
            encode_message(&mut masked, m, Some(KEY));
            encode_message(&mut plain, m, None);
        }
        assert_eq!(decode_all(&mut server(), &masked), Ok(msgs.clone()));
        let mut client = Decoder::new(Role::Client, Limits::default());
        assert_eq!(decode_all(&mut client, &plain), Ok(msgs));
    }
}
