//! A WebSocket session: after the `101`, this task reads frames, answers control frames, turns
//! client messages into engine requests and keeps the heartbeat. Output (deltas, `done`,
//! errors, PINGs) goes to the connection's queue and leaves through its writer task.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::json;

use super::flow::Flow;
use super::heartbeat::{Beat, Heartbeat};
use super::json::write_json_frame;
use super::protocol::{self, ClientMsg, ProtocolError};
use super::request;
use super::state::ConnState;
use crate::engine::{EngineMsg, SeqKey};
use crate::server::conn::Conn;
use crate::server::io::ConnRead;
use crate::server::shard::Shard;
use crate::store::thread::StoreOp;
use crate::ws::close::CloseCode;
use crate::ws::codec::{Decoder, Message};
use crate::ws::frame::{write_frame, Limits, OpCode, Role};
use crate::ws::handshake::{Accepted, Compression, StreamMode};

/// Bytes asked of the socket per read on an established session.
const READ_CHUNK: usize = 512;
/// How long to keep reading (and discarding) after the server sent a close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Session state of a WebSocket connection.
pub struct WsState {
    pub session: String,
    pub token: String,
    pub model: String,
    pub mode: StreamMode,
    /// SHA-256 of `token` (what the store keeps; set when resume is on).
    pub token_hash: [u8; 32],
    /// Generations in flight on this connection: client id → engine key.
    pub reqs: Vec<(Box<str>, SeqKey)>,
    /// Resumed generations this connection follows: client id, ticket, store name.
    pub follows: Vec<(Box<str>, u64, crate::store::GenId)>,
    pub hb: Heartbeat,
    pub close_sent: bool,
    /// SIGTERM arrived: close with 1001 when the last generation ends.
    pub shutting_down: bool,
    /// The authenticated tenant, as the table had it at the handshake.
    pub tenant: Option<std::sync::Arc<crate::ws::Tenant>>,
}

/// Runs the session until the connection closes.
pub async fn run<R: ConnRead>(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    rd: &mut R,
    mut buf: BytesMut,
    accepted: Accepted,
) {
    let now = Instant::now();
    conn.state.advance(ConnState::Active, now, &shard.metrics);
    let cfg = &shard.shared.config.session;
    let (session, token) = new_ids();
    let resumable = shard.shared.store.is_some();
    let token_hash = if resumable {
        crate::store::token_hash(&token)
    } else {
        [0; 32]
    };
    let zstd = accepted.compression == Compression::Zstd;
    if zstd || accepted.deflate.is_some() || accepted.window.is_some() {
        // The credit starts after the `session` message (it is not charged).
        let flow = Flow::new(zstd, accepted.deflate.as_ref(), None);
        *conn.flow.borrow_mut() = Some(Box::new(flow));
        // Everything queued so far (the 101) is not a frame of ours.
        let mut out = conn.out.borrow_mut();
        out.sealed = out.buf.len();
    }
    {
        let mut out = conn.out.borrow_mut();
        let mut msg = json!({
            "type": "session", "session": session, "token": token,
            "heartbeat_ms": cfg.heartbeat_interval.as_millis() as u64,
            "window": accepted.window.unwrap_or(cfg.initial_window),
            "flow_control": if accepted.window.is_some() { "credit" } else { "socket" },
            "compression": accepted.compression.as_str(),
            "model": accepted.model,
            "stream_mode": accepted.stream_mode.as_str(),
            "resumable": resumable,
        });
        if let Some(why) = accepted.compression_declined {
            msg["compression_declined"] = why.into();
        }
        if let Some(store) = shard.shared.store.as_ref() {
            msg["resume_grace_ms"] = (shard.shared.config.resume.grace.as_millis() as u64).into();
            msg["instance"] = (*store.instance).into();
        }
        write_json_frame(&mut out.buf, &msg);
    }
    *conn.ws.borrow_mut() = Some(WsState {
        session,
        token,
        token_hash,
        model: accepted.model,
        mode: accepted.stream_mode,
        reqs: Vec::new(),
        follows: Vec::new(),
        hb: Heartbeat::new(
            shard.now_us(),
            cfg.heartbeat_interval,
            cfg.heartbeat_dead_rtos,
        ),
        close_sent: false,
        shutting_down: false,
        tenant: accepted.tenant.clone(),
    });
    super::flow::pump(shard, conn, false);
    if let (Some(f), Some(w)) = (conn.flow.borrow_mut().as_deref_mut(), accepted.window) {
        f.start_credit(w);
    }
    shard.mark_dirty(conn);
    if shard.draining.get() {
        on_shutdown(shard, conn, &[]);
    }
    let limits = Limits {
        max_frame_size: cfg.max_frame_bytes as u64,
        max_message_size: cfg.max_message_bytes as u64,
        allowed_rsv: 0,
    };
    let mut dec = Decoder::new(Role::Server, limits);
    if accepted.deflate.is_some() {
        // We always answer `client_no_context_takeover`: each client message inflates alone.
        dec = dec.with_deflate(false);
    }
    if buf.is_empty() {
        // The handshake's read buffer is larger than an idle session needs.
        buf = BytesMut::new();
    }
    loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(msg)) => {
                    if !on_message(shard, conn, msg) {
                        shard.flush_dirty();
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    close_with(
                        shard,
                        conn,
                        e.close_code(),
                        &e.to_string(),
                        close_label(e.close_code()),
                    );
                    shard.flush_dirty();
                    linger(rd, &mut buf).await;
                    return;
                }
            }
        }
        shard.flush_dirty();
        if conn.is_closing() {
            linger(rd, &mut buf).await;
            return;
        }
        if buf.is_empty() && buf.capacity() > 8 * READ_CHUNK {
            buf = BytesMut::new();
        }
        match rd.read_more(&mut buf, READ_CHUNK).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

fn close_label(code: CloseCode) -> &'static str {
    match code {
        CloseCode::INVALID_PAYLOAD => "invalid_payload",
        CloseCode::TOO_BIG => "too_big",
        CloseCode::GOING_AWAY => "going_away",
        CloseCode::NORMAL => "normal",
        _ => "protocol",
    }
}

/// Reads and discards until the peer closes or the linger time passes, so our close frame is
/// not destroyed by a reset (closing a socket with unread data sends RST).
async fn linger<R: ConnRead>(rd: &mut R, buf: &mut BytesMut) {
    let deadline = Instant::now() + CLOSE_LINGER;
    loop {
        buf.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, rd.read_more(buf, READ_CHUNK)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return,
        }
    }
}

/// Handles one message; false ends the session.
fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, msg: Message) -> bool {
    match msg {
        Message::Text(text) => {
            shard.metrics.ws_messages_in.inc();
            conn.last_active.set(Instant::now());
            let result = match protocol::parse(&text, &shard.shared.config.session) {
                Ok(m) => on_client_message(shard, conn, m),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                send_error(shard, conn, &e);
            }
        }
        Message::Binary(_) => {
            shard.metrics.ws_messages_in.inc();
            let e = ProtocolError::new(None, "binary_not_supported", "send JSON text frames");
            send_error(shard, conn, &e);
        }
        Message::Ping(payload) => {
            write_frame(&mut conn.out.borrow_mut().buf, OpCode::Pong, &payload);
            shard.mark_dirty(conn);
        }
        Message::Pong(payload) => {
            let now_us = shard.now_us();
            let rtt = conn
                .ws
                .borrow_mut()
                .as_mut()
                .and_then(|ws| ws.hb.pong(&payload, now_us));
            if let Some(rtt) = rtt {
                shard.metrics.ws_rtt.observe(rtt);
            }
        }
        Message::Close(close) => {
            // A deliberate close: nobody will resume these, cancel them now (a vanished client's
            // generations wait for a resume instead, see `conn::finish`).
            let reqs = conn
                .ws
                .borrow_mut()
                .as_mut()
                .map(|ws| std::mem::take(&mut ws.reqs))
                .unwrap_or_default();
            for (_, key) in reqs {
                shard.send_control(EngineMsg::Cancel(key));
            }
            let (code, reason) = match &close {
                Some((code, reason)) => (*code, String::from_utf8_lossy(reason).into_owned()),
                None => (CloseCode::NORMAL, String::new()),
            };
            // Echo the peer's code (RFC 6455 §5.5.1); an empty close is answered empty.
            let already = conn.ws.borrow().as_ref().is_some_and(|w| w.close_sent);
            if !already {
                if let Some(ws) = conn.ws.borrow_mut().as_mut() {
                    ws.close_sent = true;
                }
                let mut out = conn.out.borrow_mut();
                if close.is_some() {
                    let mut payload = BytesMut::new();
                    crate::ws::close::encode_close_payload(&mut payload, code, &reason);
                    write_frame(&mut out.buf, OpCode::Close, &payload);
                } else {
                    write_frame(&mut out.buf, OpCode::Close, &[]);
                }
                shard.metrics.close("normal");
            }
            conn.close_after_flush(shard);
            return false;
        }
    }
    true
}

fn on_client_message(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    msg: ClientMsg,
) -> Result<(), ProtocolError> {
    match msg {
        ClientMsg::Generate(g) => request::start_ws(shard, conn, *g),
        ClientMsg::Cancel { id } => {
            let key = conn
                .ws
                .borrow()
                .as_ref()
                .and_then(|ws| ws.reqs.iter().find(|(i, _)| **i == *id).map(|(_, k)| *k));
            if let Some(key) = key {
                shard.send_control(EngineMsg::Cancel(key));
                return Ok(());
            }
            match (
                super::resume::followed_gen(conn, &id),
                shard.shared.store.as_ref(),
            ) {
                // The owner (here or on another instance) sees it at its next renewal.
                (Some(gen), Some(store)) if store.send(shard.id, StoreOp::Cancel(gen.clone())) => {
                    Ok(())
                }
                (Some(_), _) => Err(ProtocolError::new(
                    Some(&id),
                    "store_unavailable",
                    "the state queue is full; retry",
                )),
                (None, _) => Err(ProtocolError::new(
                    Some(&id),
                    "unknown_id",
                    format!("no generation {id:?} is running"),
                )),
            }
        }
        ClientMsg::Ack { id, seq } => {
            // A followed generation, else one of this session's own (running or finished).
            let gen = super::resume::followed_gen(conn, &id).or_else(|| {
                let ws = conn.ws.borrow();
                Some(crate::store::gen_id(&ws.as_ref()?.session, &id))
            });
            if let (Some(gen), Some(store)) = (gen, shard.shared.store.as_ref()) {
                // Best effort: an ack that finds the queue full only delays the trim.
                let _ = store.send(shard.id, StoreOp::Trim(gen, seq));
            }
            Ok(())
        }
        ClientMsg::WindowUpdate { bytes } => {
            if super::flow::window_update(shard, conn, bytes) {
                Ok(())
            } else {
                Err(ProtocolError::new(
                    None,
                    "flow_control_error",
                    "window_update would take the credit past 2^31-1 bytes; ignored",
                ))
            }
        }
        ClientMsg::Resume {
            session,
            token,
            id,
            after,
        } => super::resume::start(shard, conn, session, token, id, after),
        ClientMsg::Ping => {
            write_json_frame(&mut conn.out.borrow_mut().buf, &json!({"type": "pong"}));
            shard.mark_dirty(conn);
            Ok(())
        }
    }
}

pub fn send_error(shard: &Shard, conn: &Rc<Conn>, e: &ProtocolError) {
    write_json_frame(&mut conn.out.borrow_mut().buf, &e.to_json());
    shard.mark_dirty(conn);
}

/// Sends a close frame (once) and closes after the flush.
pub fn close_with(shard: &Shard, conn: &Conn, code: CloseCode, reason: &str, label: &str) {
    let mut ws = conn.ws.borrow_mut();
    if let Some(ws) = ws.as_mut() {
        if !ws.close_sent {
            ws.close_sent = true;
            let mut payload = BytesMut::new();
            let reason = crate::ws::close::truncate_reason(reason);
            crate::ws::close::encode_close_payload(&mut payload, code, reason);
            write_frame(&mut conn.out.borrow_mut().buf, OpCode::Close, &payload);
            shard.metrics.close(label);
        }
    }
    drop(ws);
    conn.close_after_flush(shard);
}

/// Heartbeat and idle timeout, every 100 ms.
pub fn on_tick(shard: &Shard, conn: &Rc<Conn>, now: Instant, now_us: u64) {
    let (beat, idle) = {
        let mut ws = conn.ws.borrow_mut();
        let Some(ws) = ws.as_mut() else { return };
        let idle = ws.reqs.is_empty()
            && now.duration_since(conn.last_active.get()) > shard.shared.config.server.idle_timeout;
        (ws.hb.tick(now_us), idle)
    };
    match beat {
        Beat::Ping(stamp) => {
            write_frame(
                &mut conn.out.borrow_mut().buf,
                OpCode::Ping,
                &stamp.to_be_bytes(),
            );
            shard.mark_dirty(conn);
        }
        Beat::Dead => {
            tracing::debug!(conn = conn.key.get(), "peer missed its PONG: closing");
            shard.metrics.close("dead_peer");
            conn.close_after_flush(shard);
            conn.abort();
            return;
        }
        Beat::Nothing => {}
    }
    if idle {
        close_with(shard, conn, CloseCode::NORMAL, "idle timeout", "idle");
    }
}

/// SIGTERM: tell the client (a final `session` note with the resume token), then close with
/// 1001 at once if nothing runs, or when the last generation ends.
pub fn on_shutdown(shard: &Shard, conn: &Rc<Conn>, handed: &[(SeqKey, crate::store::GenId, u64)]) {
    let idle = {
        let mut ws = conn.ws.borrow_mut();
        let Some(ws) = ws.as_mut() else { return };
        if ws.shutting_down {
            return;
        }
        ws.shutting_down = true;
        let mut note = json!({"type": "session", "session": ws.session, "token": ws.token,
            "closing": true, "reason": "server shutting down"});
        // Handed over (shared store): resume these on another instance, right away.
        let resume: Vec<serde_json::Value> = ws
            .reqs
            .iter()
            .filter_map(|(id, key)| {
                let (_, _, seq) = handed.iter().find(|(k, _, _)| k == key)?;
                Some(json!({"id": &**id, "after": seq}))
            })
            .collect();
        if !resume.is_empty() {
            ws.reqs
                .retain(|(_, key)| !handed.iter().any(|(k, _, _)| k == key));
            note["resume"] = resume.into();
        }
        write_json_frame(&mut conn.out.borrow_mut().buf, &note);
        ws.reqs.is_empty()
    };
    shard.mark_dirty(conn);
    if idle {
        close_with(
            shard,
            conn,
            CloseCode::GOING_AWAY,
            "server shutting down",
            "going_away",
        );
    }
}

/// A session id and a resume token, both random.
fn new_ids() -> (String, String) {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 24];
    let _ = SystemRandom::new().fill(&mut b);
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    (format!("s-{}", hex(&b[..8])), hex(&b[8..]))
}
