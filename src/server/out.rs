//! A connection's outgoing bytes and the writer task that drains them.
//!
//! Small frames (deltas, pongs, control messages) are serialized back to back into one
//! `BytesMut`; a payload that already lives in a `Bytes` (a PING's payload echoed in a PONG, a
//! large body) is queued as its own segment after its header, without a copy. The writer sends
//! everything queued with one `write`/`writev`, so frames that piled up during an engine batch
//! leave in one syscall. Buffers are recycled: once a write completes its `Bytes` are dropped
//! and the `BytesMut` reclaims the same allocation on its next `reserve`.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoVecBuf;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

/// Frames waiting to be written.
#[derive(Default)]
pub struct OutQueue {
    /// Small frames, serialized back to back.
    pub buf: BytesMut,
    /// Earlier segments, in order, when a zero-copy payload was queued.
    segs: Vec<Bytes>,
    segs_len: usize,
    /// Bytes of `buf` the flow layer already encoded (`session::flow`); the rest is new.
    pub sealed: usize,
}

impl OutQueue {
    pub fn len(&self) -> usize {
        self.buf.len() + self.segs_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a payload that already lives in `Bytes` (after its header was put in `buf`).
    pub fn push_bytes(&mut self, payload: Bytes) {
        if payload.len() < 256 {
            self.buf.extend_from_slice(&payload);
            return;
        }
        if !self.buf.is_empty() {
            self.sealed = 0;
            let head = self.buf.split().freeze();
            self.segs_len += head.len();
            self.segs.push(head);
        }
        self.segs_len += payload.len();
        self.segs.push(payload);
    }

    /// Moves everything queued into `into` (which must be empty), in order.
    pub fn take(&mut self, into: &mut Vec<Bytes>) {
        into.append(&mut self.segs);
        self.segs_len = 0;
        self.sealed = 0;
        if !self.buf.is_empty() {
            into.push(self.buf.split().freeze());
        }
    }

    /// Gives back memory of a connection that went idle (bounds idle RSS per connection).
    pub fn shrink_if_idle(&mut self, keep: usize) {
        if self.is_empty() && self.buf.capacity() > keep {
            self.buf = BytesMut::new();
        }
    }
}

/// `iovec`s over a list of `Bytes`, for `writev`.
struct IoVecs {
    iov: Vec<libc::iovec>,
    segs: Vec<Bytes>,
}

// SAFETY: `iov` points into `segs`' heap buffers, which do not move while the runtime owns this
// value (Bytes never relocates its data), and `iov` is not resized during the operation.
unsafe impl IoVecBuf for IoVecs {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

/// Most iovecs per `writev` (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// Writes all of `segs` (emptying it), with one syscall when the socket takes it all.
pub async fn write_all<W: AsyncWriteRent>(w: &mut W, segs: &mut Vec<Bytes>) -> io::Result<usize> {
    let total: usize = segs.iter().map(Bytes::len).sum();
    if segs.len() == 1 {
        let Some(seg) = segs.pop() else { return Ok(0) };
        let (res, _) = w.write_all(seg).await;
        return res;
    }
    let mut pending: Vec<Bytes> = std::mem::take(segs);
    while !pending.is_empty() {
        let n_iov = pending.len().min(MAX_IOV);
        let iov = pending[..n_iov]
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let (res, back) = w.writev(IoVecs { iov, segs: pending }).await;
        pending = back.segs;
        let mut n = res?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for seg in pending.iter_mut() {
            if n >= seg.len() {
                n -= seg.len();
                done += 1;
            } else {
                seg.advance(n);
                break;
            }
        }
        pending.drain(..done);
    }
    *segs = pending;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keeps_order_across_zero_copy_segments() {
        let mut q = OutQueue::default();
        q.buf.extend_from_slice(b"ab");
        q.push_bytes(Bytes::from(vec![b'x'; 300]));
        q.buf.extend_from_slice(b"cd");
        assert_eq!(q.len(), 304);
        let mut v = Vec::new();
        q.take(&mut v);
        let joined: Vec<u8> = v.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(&joined[..2], b"ab");
        assert_eq!(&joined[302..], b"cd");
        assert!(q.is_empty());
    }
}
