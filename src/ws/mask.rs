//! Payload masking (RFC 6455 §5.3): `byte[i] ^= key[i % 4]`.
//!
//! Masking is an involution, so the same function masks (client) and unmasks
//! (server). It runs on every byte a client sends, in place in the read buffer,
//! so it works a block at a time: 32-byte blocks XORed with a repeated key (a
//! plain byte loop over fixed-size arrays that LLVM turns into SIMD XORs), then
//! 8-byte words (`u64::from_ne_bytes`, unaligned loads are fine on every target
//! we build for), then the last 0–7 bytes one by one.

/// Bytes per vectorised block; a multiple of 8 so the key phase is unchanged
/// after each block.
const BLOCK: usize = 32;

/// Unmasks (or masks) `buf` in place with `key`, starting at key phase 0.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    apply_mask_offset(buf, key, 0);
}

/// Unmasks (or masks) `buf` in place as if it began `offset` bytes into a
/// payload masked with `key`: `buf[i] ^= key[(offset + i) % 4]`.
///
/// This lets a decoder unmask a frame's payload piece by piece as it arrives.
#[inline]
pub fn apply_mask_offset(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    if buf.len() < 8 {
        // Short payloads (pings, small deltas) skip the block setup entirely.
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
        return;
    }

    let mut key_block = [0u8; BLOCK];
    for (i, k) in key_block.iter_mut().enumerate() {
        *k = key[i & 3];
    }

    let mut blocks = buf.chunks_exact_mut(BLOCK);
    for block in &mut blocks {
        for (b, k) in block.iter_mut().zip(key_block.iter()) {
            *b ^= *k;
        }
    }

    let key_word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = blocks.into_remainder().chunks_exact_mut(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(w) ^ key_word).to_ne_bytes());
    }

    // Every block and word is a multiple of 4 long, so the tail starts at key phase 0.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The key as seen from `offset` bytes into the payload.
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let mut k = key;
    k.rotate_left(offset & 3);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn matches_naive_for_all_lengths_and_offsets() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..300 {
            for offset in 0..8 {
                let mut fast = pattern(len);
                let mut slow = fast.clone();
                apply_mask_offset(&mut fast, key, offset);
                naive(&mut slow, key, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn matches_naive_on_unaligned_slices() {
        let key = [1, 2, 3, 4];
        let base = pattern(300);
        for start in 0..9 {
            let mut fast = base.clone();
            let mut slow = base.clone();
            apply_mask(&mut fast[start..], key);
            naive(&mut slow[start..], key, 0);
            assert_eq!(fast, slow, "start {start}");
        }
    }

    #[test]
    fn mask_is_an_involution() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let original = pattern(1000);
        let mut buf = original.clone();
        apply_mask(&mut buf, key);
        assert_ne!(buf, original);
        apply_mask(&mut buf, key);
        assert_eq!(buf, original);
    }

    #[test]
    fn piecewise_unmask_equals_whole() {
        let key = [9, 8, 7, 6];
        let original = pattern(257);
        let mut whole = original.clone();
        apply_mask(&mut whole, key);
        for split in [0, 1, 3, 5, 31, 32, 33, 100, 256, 257] {
            let mut pieces = original.clone();
            let (a, b) = pieces.split_at_mut(split);
            apply_mask_offset(a, key, 0);
            apply_mask_offset(b, key, split);
            assert_eq!(pieces, whole, "split {split}");
        }
    }

    #[test]
    fn rfc6455_hello_example() {
        // §5.7: masked "Hello" payload with key 37 fa 21 3d.
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(&payload, b"Hello");
    }
}
