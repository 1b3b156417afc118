//! Incremental UTF-8 validation of a text message that arrives in pieces
//! (fragments, or partial reads of one frame).
//!
//! RFC 6455 §8.1 asks an endpoint to fail the connection on invalid UTF-8, and
//! Autobahn (cases 6.4.x) expects it to do so as soon as the bytes seen are
//! certainly invalid, not at the end of the message. [`Utf8Validator::feed`]
//! therefore rejects a chunk the moment it contains an invalid sequence, while
//! accepting a chunk that ends inside a code point (up to 3 bytes are carried
//! over). It builds on `std::str::from_utf8`, whose error tells apart "invalid"
//! (`error_len() == Some(_)`) from "valid but cut short" (`None`), and never
//! allocates.

use super::error::WsError;

/// Validation state between chunks: the bytes of an incomplete code point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    /// Leading bytes of a code point split across chunks (a valid prefix).
    pending: [u8; 4],
    /// How many bytes of `pending` are in use (0–3).
    pending_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Validator {
            pending: [0; 4],
            pending_len: 0,
        }
    }

    /// Validates the next chunk. Fails as soon as the bytes seen so far cannot
    /// be the start of valid UTF-8; a code point cut at the chunk's end is kept
    /// for the next call.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), WsError> {
        let rest = if self.pending_len > 0 {
            let used = self.complete_pending(chunk)?;
            &chunk[used..]
        } else {
            chunk
        };
        if self.pending_len > 0 {
            // `complete_pending` consumed the whole chunk and the code point is
            // still a valid prefix.
            return Ok(());
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(WsError::InvalidUtf8),
            Err(e) => {
                // A valid prefix of a code point at the end: at most 3 bytes.
                let tail = &rest[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
        }
    }

    /// Ends the message: fails if it stopped inside a code point. Resets the
    /// validator for the next message either way.
    pub fn finish(&mut self) -> Result<(), WsError> {
        let complete = self.pending_len == 0;
        self.reset();
        if complete {
            Ok(())
        } else {
            Err(WsError::InvalidUtf8)
        }
    }

    /// Forgets any pending bytes.
    pub fn reset(&mut self) {
        self.pending_len = 0;
    }

    /// Whether the bytes fed so far end on a code-point boundary.
    pub const fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    /// Moves bytes from `chunk` into the pending code point until it is
    /// complete or the chunk runs out; returns how many bytes were used.
    fn complete_pending(&mut self, chunk: &[u8]) -> Result<usize, WsError> {
        let have = usize::from(self.pending_len);
        let need = match self.pending[0] {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            // Unreachable: `pending` only ever holds a valid prefix. Fail
            // closed rather than panic.
            _ => return Err(WsError::InvalidUtf8),
        };
        let take = (need - have).min(chunk.len());
        self.pending[have..have + take].copy_from_slice(&chunk[..take]);
        let len = have + take;
        match std::str::from_utf8(&self.pending[..len]) {
            Ok(_) => self.pending_len = 0,
            Err(e) if e.error_len().is_some() => return Err(WsError::InvalidUtf8),
            Err(_) => self.pending_len = len as u8,
        }
        Ok(take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<(), WsError> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, bytes.len());
            v.feed(&bytes[start..cut])?;
            start = cut;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn whole_valid_and_invalid() {
        assert!(validate_in_pieces("Hello-µ@ßöäüàá-UTF-8!!".as_bytes(), &[]).is_ok());
        assert!(validate_in_pieces(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", &[]).is_ok());
        assert!(validate_in_pieces(
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            &[]
        )
        .is_err());
    }

    #[test]
    fn code_point_split_everywhere_is_valid() {
        let s = "a€𝄞é中";
        let bytes = s.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                assert!(validate_in_pieces(bytes, &[i, j]).is_ok(), "cuts {i} {j}");
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        assert!(validate_in_pieces(bytes, &cuts).is_ok());
    }

    #[test]
    fn incomplete_at_finish_fails() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xe2, 0x82]).is_ok());
        assert!(!v.is_complete());
        assert_eq!(v.finish(), Err(WsError::InvalidUtf8));
        // `finish` resets: the next message starts clean.
        assert!(v.feed(b"ok").is_ok());
        assert!(v.finish().is_ok());
    }

    #[test]
    fn fails_fast_on_certainly_invalid_prefix() {
        // Autobahn 6.4.1-style: the invalid bytes are rejected when fed, not at finish.
        let mut v = Utf8Validator::new();
        assert!(v.feed("κόσμε".as_bytes()).is_ok());
        assert_eq!(v.feed(&[0xf4, 0x90, 0x80, 0x80]), Err(WsError::InvalidUtf8));

        // A surrogate lead (ED A0) is invalid after its second byte.
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xed]).is_ok());
        assert_eq!(v.feed(&[0xa0]), Err(WsError::InvalidUtf8));

        // Overlong E0 80 is invalid after its second byte even across chunks.
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[b'a', 0xe0]).is_ok());
        assert_eq!(v.feed(&[0x80]), Err(WsError::InvalidUtf8));

        // A lead byte followed by a non-continuation byte in the next chunk.
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xc3]).is_ok());
        assert_eq!(v.feed(b"a"), Err(WsError::InvalidUtf8));

        // Bytes that can never appear.
        for b in [0x80u8, 0xc0, 0xc1, 0xf5, 0xff] {
            assert_eq!(
                Utf8Validator::new().feed(&[b]),
                Err(WsError::InvalidUtf8),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn empty_chunks_are_harmless() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[]).is_ok());
        assert!(v.feed(&[0xf0, 0x9d]).is_ok());
        assert!(v.feed(&[]).is_ok());
        assert!(v.feed(&[0x84]).is_ok());
        assert!(v.feed(&[0x9e]).is_ok());
        assert!(v.finish().is_ok());
    }

    proptest! {
        #[test]
        fn fuzz_utf8_agrees_with_std(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                     cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_in_pieces(&bytes, &cuts).is_ok(), expected);
        }

        #[test]
        fn fuzz_utf8_valid_strings_any_split(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert!(validate_in_pieces(s.as_bytes(), &cuts).is_ok());
        }
    }
}
