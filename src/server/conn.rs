//! One task per connection: it starts as HTTP/1.1 and may upgrade to a WebSocket session. A
//! second task, the writer, drains the connection's [`OutQueue`]. Both live on the shard that
//! accepted the socket and share the [`Conn`] through an `Rc`.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::Splitable;
use monoio::net::TcpStream;

use crate::engine::EngineMsg;
use crate::http::error::HttpError;
use crate::server::io::{ConnRead, ConnWrite};
use crate::server::notify::Notify;
use crate::server::out::OutQueue;
use crate::server::shard::Shard;
use crate::session::state::{ConnState, StateMachine};
use crate::session::ws::WsState;

/// Output capacity a connection keeps when it goes idle (bounds idle memory).
const IDLE_OUT_CAPACITY: usize = 4096;
/// How long a closing connection may take to flush before its socket is shut down hard.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// A connection's shared state (reader task, writer task, dispatcher, tick).
pub struct Conn {
    pub key: Cell<usize>,
    pub fd: RawFd,
    pub state: StateMachine,
    pub out: RefCell<OutQueue>,
    pub wake_writer: Notify,
    /// Already queued in the shard's dirty list for this dispatch.
    pub dirty: Cell<bool>,
    /// Present once the connection is a WebSocket session.
    pub ws: RefCell<Option<WsState>>,
    /// When the first byte of a still-incomplete request head arrived (slow-loris guard).
    pub head_started: Cell<Option<Instant>>,
    /// Last client data (requests, messages): idle timeout.
    pub last_active: Cell<Instant>,
    /// When closing began: the writer flushes, shuts the write side down and stops.
    pub closing_since: Cell<Option<Instant>>,
    /// Sequences of this connection are paused in the engine (send backlog too large), since.
    pub paused: Cell<bool>,
    pub paused_since: Cell<Option<Instant>>,
    /// `paused`, shared with the state thread: the logs this connection follows are not fed
    /// to it meanwhile (a flag, not a message, so that no full queue can lose the resume).
    pub backlogged: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// zstd and the credit window of a WebSocket session that asked for them.
    pub flow: RefCell<Option<Box<crate::session::flow::Flow>>>,
    /// Bytes the writer took and the socket has not accepted yet.
    pub in_flight: Cell<usize>,
    /// The generation an HTTP response is waiting for (responses go out in request order).
    pub http_busy: Cell<Option<crate::engine::SeqKey>>,
    /// The store ticket an HTTP response is waiting on instead (a read, or a follow of a
    /// logged generation: `GET /v1/responses/{id}`, a stream picked up again).
    pub http_follow: Cell<Option<u64>>,
    /// An HTTP answer waits for the store to hold its generation's log (a background
    /// response's `queued` object).
    pub http_stored: Cell<bool>,
    /// Signalled when `http_busy`, `http_follow` or `http_stored` clears.
    pub response_done: Notify,
    /// The tenant's connection slot, for a WebSocket session of a tenant (freed with the
    /// connection).
    pub tenant_slot: RefCell<Option<crate::session::limits::ConnSlot>>,
    /// Its place in its client address's connection count (per-IP limits).
    pub ip_slot: RefCell<Option<crate::session::limits::IpSlot>>,
}

impl Conn {
    fn new(fd: RawFd, now: Instant) -> Self {
        Self {
            key: Cell::new(usize::MAX),
            fd,
            state: StateMachine::new(now),
            out: RefCell::new(OutQueue::default()),
            wake_writer: Notify::default(),
            dirty: Cell::new(false),
            ws: RefCell::new(None),
            head_started: Cell::new(None),
            last_active: Cell::new(now),
            closing_since: Cell::new(None),
            paused: Cell::new(false),
            backlogged: Default::default(),
            paused_since: Cell::new(None),
            flow: RefCell::new(None),
            in_flight: Cell::new(0),
            http_busy: Cell::new(None),
            http_follow: Cell::new(None),
            http_stored: Cell::new(false),
            response_done: Notify::default(),
            tenant_slot: RefCell::new(None),
            ip_slot: RefCell::new(None),
        }
    }

    /// Output bytes this connection holds: being written, queued for the socket, held for credit.
    pub fn queued_bytes(&self) -> usize {
        let held = self.flow.borrow().as_ref().map_or(0, |f| f.held_bytes());
        self.in_flight.get() + self.out.borrow().len() + held
    }

    pub fn is_closing(&self) -> bool {
        self.closing_since.get().is_some()
    }

    /// Flush what is queued, then close (idempotent).
    pub fn close_after_flush(&self, shard: &Shard) {
        if self.closing_since.get().is_none() {
            self.closing_since.set(Some(Instant::now()));
            self.state
                .advance(ConnState::GracefulClosing, Instant::now(), &shard.metrics);
        }
        self.wake_writer.notify();
    }

    /// Stops all I/O at once: pending reads return EOF, pending writes fail.
    pub fn abort(&self) {
        // SAFETY: shutdown(2) on a descriptor this connection owns; it does not close it.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        self.wake_writer.notify();
    }
}

/// Serves one accepted socket until it closes; `tls`: the listener is the TLS one.
pub async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    over_capacity: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    ip_slot: Option<crate::session::limits::IpSlot>,
) {
    let _ = stream.set_nodelay(true);
    let now = Instant::now();
    let conn = Rc::new(Conn::new(stream.as_raw_fd(), now));
    *conn.ip_slot.borrow_mut() = ip_slot;
    let key = shard.conns.borrow_mut().insert(conn.clone());
    conn.key.set(key);
    shard.metrics.active_connections.inc();
    conn.state
        .advance(ConnState::Handshaking, now, &shard.metrics);
    match tls {
        None => {
            let (rd, wr) = stream.into_split();
            run(&shard, &conn, rd, wr, over_capacity).await;
        }
        // Boxed: the TLS handshake and halves would otherwise make every connection's task
        // (plain ones too) as large as the TLS one.
        Some(config) => Box::pin(serve_tls(&shard, &conn, stream, config, over_capacity)).await,
    }
    crate::session::flow::release_conn(&shard, &conn);
    conn.tenant_slot.borrow_mut().take();
    conn.ip_slot.borrow_mut().take();
    clear_pause(&shard, &conn);
    conn.state
        .advance(ConnState::Closed, Instant::now(), &shard.metrics);
    shard.conns.borrow_mut().try_remove(key);
    shard.metrics.active_connections.sub(1);
}

/// A connection its client address may not open now (per-IP limits): a plain `429` with
/// `Retry-After` on the plain port, a bare close on the TLS port (nothing readable to say there
/// before a handshake), at once and without reading.
pub async fn refuse_ip(mut stream: TcpStream, why: crate::session::limits::IpRefusal, tls: bool) {
    use monoio::io::AsyncWriteRentExt;
    if !tls {
        let body = format!(
            "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"too many connections from your address ({})\"}}}}",
            why.label()
        );
        let msg = format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            why.retry_after_secs(),
            body.len()
        );
        let _ = stream.write_all(msg.into_bytes()).await;
    }
    let _ = monoio::io::AsyncWriteRent::shutdown(&mut stream).await;
    if !tls {
        // Read what the client sent for a moment: closing with unread data would reset the
        // connection and lose the answer.
        let mut buf = BytesMut::new();
        let linger = async {
            while let Ok(n) = crate::server::io::read_into(&mut stream, &mut buf, 1024).await {
                if n == 0 {
                    break;
                }
                buf.clear();
            }
        };
        let _ = monoio::time::timeout(Duration::from_millis(500), linger).await;
    }
}

/// The TLS handshake (with the handshake timeout: a TLS slow-loris is closed too), then the
/// connection over TLS.
async fn serve_tls(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    mut stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    over_capacity: bool,
) {
    let limit = shard.shared.config.server.handshake_timeout;
    let hs = monoio::time::timeout(limit, super::tls::accept(&mut stream, config)).await;
    match hs.unwrap_or(Err(super::tls::Failure::Timeout)) {
        Ok((session, leftover)) => {
            shard.metrics.tls_handshakes.inc();
            if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                shard.metrics.tls_resumed.inc();
            }
            let (rd, wr) = super::tls::split(stream, session, leftover, conn.clone());
            run(shard, conn, rd, wr, over_capacity).await;
        }
        Err(f) => {
            shard.metrics.handshake_failure(f.label());
            tracing::info!(reason = f.label(), "TLS handshake failed");
            conn.closing_since.set(Some(Instant::now()));
        }
    }
}

/// Runs the connection's reader (HTTP, then maybe a WebSocket session) and its writer task.
async fn run<R: ConnRead, W: ConnWrite + 'static>(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    mut rd: R,
    wr: W,
    over_capacity: bool,
) {
    let writer = monoio::spawn(write_loop(shard.clone(), conn.clone(), wr));
    if over_capacity {
        shard.metrics.handshake_failure("over_capacity");
        HttpError::OverCapacity.write(&mut conn.out.borrow_mut().buf);
    } else {
        let mut buf = BytesMut::new();
        if let Some(accepted) = crate::http::conn::serve(shard, conn, &mut rd, &mut buf).await {
            crate::session::ws::run(shard, conn, &mut rd, buf, accepted).await;
        }
    }
    finish(shard, conn);
    writer.await;
}

/// The reader is done: cancel this connection's generations and let the writer finish.
fn finish(shard: &Shard, conn: &Rc<Conn>) {
    if let Some(key) = conn.http_busy.get() {
        // A logged HTTP generation (a response, a resumable chat stream) runs on like a
        // WebSocket one.
        if !crate::session::journal::detach(shard, key, conn.paused.get()) {
            shard.send_control(EngineMsg::Cancel(key));
        }
    }
    if let Some(ticket) = conn.http_follow.take() {
        crate::session::resume_http::forget(shard, ticket);
    }
    let (reqs, follows) = match conn.ws.borrow_mut().as_mut() {
        Some(ws) => (
            std::mem::take(&mut ws.reqs),
            std::mem::take(&mut ws.follows),
        ),
        None => Default::default(),
    };
    conn.close_after_flush(shard);
    for (_, key) in reqs {
        // A resumable generation runs on into its log for `resume_grace`.
        if !crate::session::journal::detach(shard, key, conn.paused.get()) {
            shard.send_control(EngineMsg::Cancel(key));
        }
    }
    for (_, ticket, _) in follows {
        crate::session::resume::unfollow(shard, ticket);
    }
}

async fn write_loop<W: ConnWrite>(shard: Rc<Shard>, conn: Rc<Conn>, mut wr: W) {
    let mut segs: Vec<Bytes> = Vec::new();
    loop {
        crate::session::flow::pump(&shard, &conn, false);
        if conn.out.borrow().is_empty() {
            // TLS records the read side produced (alerts, key updates).
            if wr.flush_pending().await.is_err() {
                conn.abort();
                return;
            }
            if conn.is_closing() {
                break;
            }
            conn.out.borrow_mut().shrink_if_idle(IDLE_OUT_CAPACITY);
            conn.wake_writer.notified().await;
            continue;
        }
        conn.out.borrow_mut().take(&mut segs);
        let taken: usize = segs.iter().map(Bytes::len).sum();
        conn.in_flight.set(taken);
        let written = wr.write_segs(&mut segs).await;
        conn.in_flight.set(0);
        match written {
            Ok(n) => shard.metrics.bytes_out.add(n as u64),
            Err(e) => {
                tracing::debug!("write: {e}");
                segs.clear();
                conn.out.borrow_mut().take(&mut segs);
                segs.clear();
                conn.abort();
                if conn.closing_since.get().is_none() {
                    conn.closing_since.set(Some(Instant::now()));
                }
                return;
            }
        }
        segs.clear();
        relieve_backpressure(&shard, &conn);
        if reads_slowly(&shard, &conn, taken) {
            // What comes next waits for the throttle tick and goes out in one write.
            shard.metrics.socket_throttles.inc();
            monoio::time::sleep(shard.shared.config.session.throttle_delay).await;
        }
    }
    let _ = wr.shutdown().await;
}

/// The send backlog's own tiers (SPEC 4 "Flow control", the same as a credit window's, the
/// room left under `max_send_backlog_bytes` standing for the credit): with `SEND_NOW` or more
/// of room, whatever is queued goes out at once; with less (and at least half the bound queued,
/// so a small bound does not throttle every client) the client is reading slower than it is
/// sent to, and once the write of that backlog (`taken` bytes) is done the writer coalesces
/// for `throttle_delay` before the next; at the bound the connection's sequences pause
/// (`apply_backpressure`).
fn reads_slowly(shard: &Shard, conn: &Conn, taken: usize) -> bool {
    let bound = shard.shared.config.session.max_send_backlog_bytes;
    let from = bound
        .saturating_sub(crate::session::flow::SEND_NOW as usize)
        .max(bound / 2);
    !conn.is_closing() && taken >= from
}

/// Pauses the connection's sequences in the engine when its send backlog passes the bound.
pub fn apply_backpressure(shard: &Shard, conn: &Conn) {
    if conn.paused.get()
        || conn.queued_bytes() <= shard.shared.config.session.max_send_backlog_bytes
    {
        return;
    }
    conn.paused.set(true);
    if conn.paused_since.replace(Some(Instant::now())).is_none() {
        shard.metrics.paused_connections.inc();
    }
    shard.metrics.backpressure_pauses.inc();
    for key in active_keys(conn) {
        shard.send_control(EngineMsg::Pause(key));
    }
    // The state thread stops feeding the logs this connection follows.
    conn.backlogged
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Every generation this connection is waiting on.
fn active_keys(conn: &Conn) -> Vec<crate::engine::SeqKey> {
    let mut keys: Vec<_> = conn.http_busy.get().into_iter().collect();
    if let Some(ws) = conn.ws.borrow().as_ref() {
        keys.extend(ws.reqs.iter().map(|(_, k)| *k));
    }
    keys
}

/// Resumes paused sequences once the backlog drained below a quarter of the bound.
fn relieve_backpressure(shard: &Shard, conn: &Conn) {
    if !conn.paused.get()
        || conn.queued_bytes() > shard.shared.config.session.max_send_backlog_bytes / 4
    {
        return;
    }
    conn.paused.set(false);
    clear_pause(shard, conn);
    for key in active_keys(conn) {
        shard.send_control(EngineMsg::Resume(key));
    }
    conn.backlogged
        .store(false, std::sync::atomic::Ordering::Relaxed);
}

/// The connection's pause ended (it drained, or it closed): the gauge follows.
fn clear_pause(shard: &Shard, conn: &Conn) {
    if conn.paused_since.take().is_some() {
        shard.metrics.paused_connections.sub(1);
    }
}

/// Per-connection timers, every 100 ms.
pub fn on_tick(shard: &Shard, conn: &Rc<Conn>, now: Instant, now_us: u64) {
    let cfg = &shard.shared.config.server;
    if let Some(since) = conn.closing_since.get() {
        if now.duration_since(since) > CLOSE_LINGER {
            conn.abort();
        }
        return;
    }
    if let Some(started) = conn.head_started.get() {
        if now.duration_since(started) > cfg.handshake_timeout {
            shard.metrics.handshake_failure("timeout");
            HttpError::Timeout.write(&mut conn.out.borrow_mut().buf);
            conn.head_started.set(None);
            conn.close_after_flush(shard);
            return;
        }
    }
    if let Some(since) = conn.paused_since.get() {
        if now.duration_since(since) > shard.shared.config.session.max_pause {
            end_slow_reader(shard, conn);
            return;
        }
    }
    if conn.ws.borrow().is_some() {
        crate::session::ws::on_tick(shard, conn, now, now_us);
    } else if conn.head_started.get().is_none()
        && now.duration_since(conn.last_active.get()) > cfg.idle_timeout
    {
        conn.close_after_flush(shard);
        conn.abort();
    }
}

/// A client that read nothing for `max_pause`: drop the connection. What it holds is freed at
/// once; its generations end (`cancelled`) or, when resumable, run on into their logs for
/// `resume_grace` like those of any client that went away.
fn end_slow_reader(shard: &Shard, conn: &Rc<Conn>) {
    tracing::info!(
        conn = conn.key.get(),
        queued = conn.queued_bytes(),
        "client read nothing for max_pause: disconnecting"
    );
    shard.metrics.close("slow_reader");
    if let Some(ws) = conn.ws.borrow_mut().as_mut() {
        // No close frame: it would queue behind everything the client did not read.
        ws.close_sent = true;
    }
    conn.close_after_flush(shard);
    conn.abort();
}

/// SIGTERM: idle connections close now; busy WebSocket sessions get a final `session` note
/// and a 1001 close once their generations finish (or at the shutdown deadline).
pub fn begin_shutdown(
    shard: &Shard,
    conn: &Rc<Conn>,
    handed: &[(crate::engine::SeqKey, crate::store::GenId, u64)],
) {
    if conn.ws.borrow().is_some() {
        crate::session::ws::on_shutdown(shard, conn, handed);
    } else {
        conn.close_after_flush(shard);
        conn.abort();
    }
}

/// The shutdown deadline passed: close with 1001 now.
pub fn force_close(shard: &Shard, conn: &Rc<Conn>, reason: &str) {
    if conn.ws.borrow().is_some() {
        crate::session::ws::close_with(
            shard,
            conn,
            crate::ws::close::CloseCode::GOING_AWAY,
            "server shutting down",
            reason,
        );
    }
    conn.close_after_flush(shard);
    conn.wake_writer.notify();
}
