//! The two halves of a connection as its tasks see them: a reader that appends plaintext to a
//! buffer and a writer that sends queued segments. Plain TCP halves implement them directly
//! over monoio's owned-buffer I/O; TLS wraps them (`tls.rs`). Everything here runs on one shard
//! thread: the futures are not `Send`, by design.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf,
};
use monoio::net::TcpStream;

/// The read side of a connection.
#[allow(async_fn_in_trait)] // shard-local futures, never sent across threads
pub trait ConnRead {
    /// Reads more bytes into `buf` (appending, at most about `want`). `Ok(0)`: end of stream.
    async fn read_more(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize>;

    /// Like [`read_more`](Self::read_more), but gives up with `Ok(None)` once `stop` resolves;
    /// the pending read is cancelled and nothing read is lost.
    async fn read_more_until<F: Future<Output = ()>>(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        stop: Pin<&mut F>,
    ) -> io::Result<Option<usize>>;
}

/// The write side of a connection.
#[allow(async_fn_in_trait)]
pub trait ConnWrite {
    /// Writes every segment (draining `segs`); returns the bytes written.
    async fn write_segs(&mut self, segs: &mut Vec<Bytes>) -> io::Result<usize>;

    /// Sends what the transport itself has queued (TLS records the read side produced:
    /// alerts, key updates). Plain TCP has none.
    async fn flush_pending(&mut self) -> io::Result<()>;

    /// Ends the write side (TLS: `close_notify` first).
    async fn shutdown(&mut self) -> io::Result<()>;
}

pub type TcpRead = OwnedReadHalf<TcpStream>;
pub type TcpWrite = OwnedWriteHalf<TcpStream>;

/// Reads more bytes into `buf` (appending) from any monoio reader. Returns 0 at end of stream.
pub async fn read_into<R: AsyncReadRent>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> io::Result<usize> {
    buf.reserve(want);
    let len = buf.len();
    let cap = buf.capacity();
    let owned = std::mem::take(buf);
    let (res, slice) = rd.read(owned.slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    res
}

/// A read that is cancelled when `stop` resolves first (io_uring hands the buffer back either
/// way). `Ok(None)`: stopped.
pub async fn read_into_until<R: CancelableAsyncReadRent, F: Future<Output = ()>>(
    rd: &mut R,
    buf: &mut BytesMut,
    want: usize,
    stop: Pin<&mut F>,
) -> io::Result<Option<usize>> {
    buf.reserve(want);
    let (len, cap) = (buf.len(), buf.capacity());
    let owned = std::mem::take(buf);
    let canceller = Canceller::new();
    let read = rd.cancelable_read(owned.slice_mut(len..cap), canceller.handle());
    let mut read = std::pin::pin!(read);
    let mut stopped = false;
    let (res, slice) = monoio::select! {
        r = &mut read => r,
        _ = stop => {
            stopped = true;
            canceller.cancel();
            read.await
        }
    };
    *buf = slice.into_inner();
    match res {
        Ok(n) if n > 0 || !stopped => Ok(Some(n)),
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(None),
        Err(e) => Err(e),
    }
}

impl ConnRead for TcpRead {
    async fn read_more(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        read_into(self, buf, want).await
    }

    async fn read_more_until<F: Future<Output = ()>>(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        stop: Pin<&mut F>,
    ) -> io::Result<Option<usize>> {
        read_into_until(self, buf, want, stop).await
    }
}

impl ConnWrite for TcpWrite {
    async fn write_segs(&mut self, segs: &mut Vec<Bytes>) -> io::Result<usize> {
        crate::server::out::write_all(self, segs).await
    }

    async fn flush_pending(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        AsyncWriteRent::shutdown(self).await
    }
}
