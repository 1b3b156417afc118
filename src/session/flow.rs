//! Outgoing WebSocket messages on their way to the socket: zstd, permessage-deflate and the
//! opt-in credit window (SPEC 4 "Flow control", "Compression").
//!
//! The session layer writes complete frames into the connection's queue as it always does. On a
//! connection with compression or a credit window, [`pump`] runs before the writer takes the
//! queue (and at the end of every dispatch): it re-encodes the data frames written since its
//! last run (zstd → binary frames; permessage-deflate → the same text messages, each deflated
//! and sent with RSV1) and moves those the credit does not cover to a held queue. Control
//! frames stay in place: a PING or PONG never waits for credit. Plain connections skip all of
//! this (`Conn::flow` is `None`).
//!
//! Credit (bytes of message payload as sent, after compression) is spent per message and given
//! back by `window_update`. The sender's tier follows the credit left: 64 KiB or more, a message
//! goes out at once; 8–64 KiB, messages are held and flushed together every `throttle_delay`;
//! under 8 KiB (or under the whole window when it is smaller) nothing is sent until the client
//! gives credit back. A message larger than the whole window would wait forever; it goes out
//! alone once every byte sent before it has been credited back, and the credit goes negative by
//! its excess (the one case a message exceeds the credit, so a window can never deadlock).
//! Held bytes count towards the connection's send backlog, whose bound pauses its sequences in
//! the engine.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::BytesMut;

use super::compress::{DeflateStream, ZstdStream};
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::ws::deflate::DeflateParams;
use crate::ws::frame::{write_frame_rsv, OpCode, RSV1};

/// Credit from which a message goes out at once.
pub const SEND_NOW: i64 = 64 * 1024;
/// Credit from which held messages are flushed at the throttle tick.
pub const COALESCE: i64 = 8 * 1024;
/// Most message bytes in one compressed frame.
const BATCH_MAX: usize = 16 * 1024;

/// A connection's flow state (present only with zstd or a credit window).
pub struct Flow {
    pub zstd: Option<ZstdStream>,
    pub deflate: Option<DeflateStream>,
    pub credit: Option<Credit>,
    held: Held,
    scratch: Vec<u8>,
    zbuf: Vec<u8>,
    joined: Vec<u8>,
    /// Message ranges of the batch being encoded (kept to reuse its allocation).
    batch: Vec<std::ops::Range<usize>>,
    /// Queued on the shard's throttle list.
    pub throttled: bool,
}

/// Encoded frames waiting for credit, back to back, and the (frame, payload) size of each.
#[derive(Default)]
struct Held {
    bytes: BytesMut,
    sizes: VecDeque<(u32, u32)>,
}

/// Sends one encoded frame (RSV bits `rsv`) now, or holds it when the credit tier says so.
fn send(
    credit: &mut Option<Credit>,
    held: &mut Held,
    shard: &Shard,
    (rsv, op): (u8, OpCode),
    data: &[u8],
    out: &mut BytesMut,
) {
    let size = data.len() as i64;
    match credit.as_mut() {
        Some(c) if held.sizes.is_empty() && c.avail >= SEND_NOW && size <= c.avail => {
            c.avail -= size;
            shard.metrics.flow_sent_now.inc();
            write_frame_rsv(out, rsv, op, data);
        }
        Some(_) => {
            shard.metrics.flow_held.inc();
            let before = held.bytes.len();
            write_frame_rsv(&mut held.bytes, rsv, op, data);
            let frame = (held.bytes.len() - before) as u32;
            held.sizes.push_back((frame, data.len() as u32));
        }
        None => write_frame_rsv(out, rsv, op, data),
    }
}

/// Sends one message as a plain text frame; `compressed`: the connection has compression, so
/// the message counts as one sent plain.
fn send_plain(
    credit: &mut Option<Credit>,
    held: &mut Held,
    shard: &Shard,
    compressed: bool,
    msg: &[u8],
    out: &mut BytesMut,
) {
    if compressed {
        shard.metrics.compress_plain.inc();
    }
    send(credit, held, shard, (0, OpCode::Text), msg, out);
}

/// The opt-in credit window.
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    pub window: i64,
    /// Credit left; negative only after an oversized message.
    pub avail: i64,
}

impl Flow {
    pub fn new(zstd: bool, deflate: Option<&DeflateParams>, window: Option<u32>) -> Self {
        Self {
            zstd: zstd.then(ZstdStream::default),
            deflate: deflate.map(DeflateStream::new),
            credit: window.map(|w| Credit {
                window: i64::from(w),
                avail: i64::from(w),
            }),
            held: Held::default(),
            scratch: Vec::new(),
            zbuf: Vec::new(),
            joined: Vec::new(),
            batch: Vec::new(),
            throttled: false,
        }
    }

    /// Opens the credit window (after the `session` message went out uncharged).
    pub fn start_credit(&mut self, window: u32) {
        self.credit = Some(Credit {
            window: i64::from(window),
            avail: i64::from(window),
        });
    }

    pub fn held_bytes(&self) -> usize {
        self.held.bytes.len()
    }

    /// Adds credit. A grant that would take the credit past 2^31-1 is refused (`false`).
    pub fn grant(&mut self, bytes: u64) -> bool {
        let Some(c) = self.credit.as_mut() else {
            return true;
        };
        let max = i64::from(crate::config::MAX_WINDOW);
        match i64::try_from(bytes) {
            Ok(b) if c.avail.saturating_add(b) <= max => {
                c.avail += b;
                true
            }
            _ => false,
        }
    }

    /// Encodes data messages (`msgs`: ranges of `src`) and sends them now or holds them. With
    /// zstd they go out as one binary frame, the messages separated by `\n`; plain, one text
    /// frame each.
    fn data(
        &mut self,
        shard: &Shard,
        src: &[u8],
        msgs: &[std::ops::Range<usize>],
        end: bool,
        out: &mut BytesMut,
    ) {
        if msgs.is_empty() {
            return;
        }
        let level = shard.zstd_level.get();
        if let (Some(d), Some(_)) = (self.deflate.as_mut(), level) {
            // One deflated message per frame: each stays the message the client expects.
            let ctx = (&*shard.shared.compression, &shard.pools);
            for (i, m) in msgs.iter().enumerate() {
                let last = end && i + 1 == msgs.len();
                let msg = &src[m.clone()];
                if d.compress(ctx, msg, last, &mut self.zbuf) {
                    shard.metrics.deflate_in.add(msg.len() as u64);
                    shard.metrics.deflate_out.add(self.zbuf.len() as u64);
                    let frame = (RSV1, OpCode::Text);
                    send(
                        &mut self.credit,
                        &mut self.held,
                        shard,
                        frame,
                        &self.zbuf,
                        out,
                    );
                } else {
                    send_plain(&mut self.credit, &mut self.held, shard, true, msg, out);
                }
            }
            return;
        }
        if let (Some(z), Some(level)) = (self.zstd.as_mut(), level) {
            let mut joined = std::mem::take(&mut self.joined);
            joined.clear();
            let input: &[u8] = match msgs {
                // One message (the usual case at light load): no copy.
                [m] => &src[m.clone()],
                _ => {
                    for (i, m) in msgs.iter().enumerate() {
                        if i > 0 {
                            joined.push(b'\n');
                        }
                        joined.extend_from_slice(&src[m.clone()]);
                    }
                    &joined
                }
            };
            let ctx = (&*shard.shared.compression, &shard.pools);
            let ok = z.compress(ctx, level, input, end, &mut self.zbuf);
            if ok {
                shard.metrics.compress_in.add(input.len() as u64);
                shard.metrics.compress_out.add(self.zbuf.len() as u64);
                send(
                    &mut self.credit,
                    &mut self.held,
                    shard,
                    (0, OpCode::Binary),
                    &self.zbuf,
                    out,
                );
            }
            self.joined = joined;
            if ok {
                return;
            }
        }
        let compressed = self.zstd.is_some() || self.deflate.is_some();
        for m in msgs {
            let msg = &src[m.clone()];
            send_plain(
                &mut self.credit,
                &mut self.held,
                shard,
                compressed,
                msg,
                out,
            );
        }
    }

    /// Most message bytes put in one compressed frame.
    fn batch_limit(&self) -> usize {
        match self.credit {
            Some(c) => (c.window as usize / 2).clamp(256, BATCH_MAX),
            None => BATCH_MAX,
        }
    }

    /// Moves held messages the credit covers to `out`; `tick`: the throttle tick (the
    /// coalescing and queueing tiers send only then). Returns whether anything moved.
    fn release(&mut self, out: &mut BytesMut, tick: bool) -> bool {
        let Some(c) = self.credit.as_mut() else {
            return false;
        };
        let open = c.avail >= SEND_NOW || tick && c.avail >= COALESCE.min(c.window);
        if !open {
            return false;
        }
        let mut moved = 0;
        while let Some(&(frame, payload)) = self.held.sizes.front() {
            let size = i64::from(payload);
            let fits = size <= c.avail || size > c.window && c.avail >= c.window;
            if !fits {
                break;
            }
            c.avail -= size;
            moved += frame as usize;
            self.held.sizes.pop_front();
        }
        if moved == 0 {
            return false;
        }
        out.extend_from_slice(&self.held.bytes.split_to(moved));
        if self.held.bytes.is_empty() {
            // Give back a burst's memory.
            self.held.bytes = BytesMut::new();
        }
        true
    }
}

/// Parses the header of one of our own (unmasked) frames: (opcode byte, header length,
/// payload length).
fn frame_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, rest) = b.split_first()?;
    let &b1 = rest.first()?;
    let (hdr, len) = match b1 & 0x7f {
        126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(b.get(2..10)?);
            (10, u64::from_be_bytes(n) as usize)
        }
        n => (2, n as usize),
    };
    (b.len() >= hdr + len).then_some((b0 & 0x0f, hdr, len))
}

/// Encodes what the session layer queued since the last run and releases what the credit
/// allows. Returns whether the writer has something new to send.
pub fn pump(shard: &Shard, conn: &Conn, tick: bool) -> bool {
    let mut flow = conn.flow.borrow_mut();
    let Some(f) = flow.as_deref_mut() else {
        return false;
    };
    let idle = conn
        .ws
        .borrow()
        .as_ref()
        .is_none_or(|ws| ws.reqs.is_empty() && ws.follows.is_empty());
    let mut out = conn.out.borrow_mut();
    let mut changed = false;
    if out.sealed < out.buf.len() {
        changed = true;
        let mut scratch = std::mem::take(&mut f.scratch);
        scratch.clear();
        let sealed = out.sealed;
        scratch.extend_from_slice(&out.buf[sealed..]);
        out.buf.truncate(sealed);
        // Consecutive data messages go out together (one compressed frame, up to the batch
        // limit); control frames keep their place. Only the last batch of a connection left
        // idle ends the zstd frame.
        let limit = f.batch_limit();
        let mut last_data_end = None;
        let mut pos = 0;
        while let Some((op, hdr, len)) = frame_header(&scratch[pos..]) {
            pos += hdr + len;
            if op & 0x8 == 0 {
                last_data_end = Some(pos);
            }
        }
        let mut batch = std::mem::take(&mut f.batch);
        batch.clear();
        let mut batch_bytes = 0;
        let mut pos = 0;
        while let Some((op, hdr, len)) = frame_header(&scratch[pos..]) {
            let frame = pos..pos + hdr + len;
            pos = frame.end;
            if op & 0x8 != 0 {
                let last = batch.last().map(|r| r.end) == last_data_end;
                f.data(shard, &scratch, &batch, idle && last, &mut out.buf);
                batch.clear();
                batch_bytes = 0;
                out.buf.extend_from_slice(&scratch[frame]);
                continue;
            }
            if batch_bytes + len > limit && !batch.is_empty() {
                f.data(shard, &scratch, &batch, false, &mut out.buf);
                batch.clear();
                batch_bytes = 0;
            }
            batch.push(frame.start + hdr..frame.end);
            batch_bytes += len + 1;
        }
        f.data(shard, &scratch, &batch, idle, &mut out.buf);
        f.batch = batch;
        // Never reached with our own frames; kept whole rather than lost.
        out.buf.extend_from_slice(&scratch[pos..]);
        if scratch.capacity() > 64 * 1024 {
            scratch = Vec::new();
        }
        f.scratch = scratch;
    }
    if f.release(&mut out.buf, tick) {
        changed = true;
        shard.metrics.flow_flushes.inc();
    }
    out.sealed = out.buf.len();
    if !f.held.sizes.is_empty() && !f.throttled {
        f.throttled = true;
        drop(out);
        drop(flow);
        shard.throttled.borrow_mut().push(conn.key.get());
    }
    changed
}

/// The throttle tick: flushes held messages of every connection waiting on it.
pub fn on_throttle_tick(shard: &Shard) {
    let keys: Vec<usize> = std::mem::take(&mut *shard.throttled.borrow_mut());
    for key in keys {
        let Some(conn) = shard.conns.borrow().get(key).cloned() else {
            continue;
        };
        if let Some(f) = conn.flow.borrow_mut().as_deref_mut() {
            f.throttled = false;
        }
        if pump(shard, &conn, true) {
            conn.wake_writer.notify();
        }
    }
}

/// `window_update`: adds credit and sends what it covers.
pub fn window_update(shard: &Shard, conn: &Rc<Conn>, bytes: u64) -> bool {
    let granted = conn
        .flow
        .borrow_mut()
        .as_deref_mut()
        .is_none_or(|f| f.grant(bytes));
    if granted {
        shard.mark_dirty(conn);
    }
    granted
}

/// Frees what a closed connection's flow holds (its compression context goes back to the
/// budget).
pub fn release_conn(shard: &Shard, conn: &Conn) {
    if let Some(f) = conn.flow.borrow_mut().as_deref_mut() {
        if let Some(z) = f.zstd.as_mut() {
            z.drop_ctx(&shard.shared.compression, &shard.pools);
        }
        if let Some(d) = f.deflate.as_mut() {
            d.drop_ctx(&shard.shared.compression, &shard.pools);
        }
        f.held = Held::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::write_frame;

    fn held_flow(window: u32, sizes: &[usize]) -> (Flow, BytesMut) {
        let mut f = Flow::new(false, None, Some(window));
        let out = BytesMut::new();
        for &n in sizes {
            let before = f.held.bytes.len();
            write_frame(&mut f.held.bytes, OpCode::Text, &vec![b'x'; n]);
            f.held
                .sizes
                .push_back(((f.held.bytes.len() - before) as u32, n as u32));
        }
        (f, out)
    }

    #[test]
    fn tiers_follow_the_credit_left() {
        // 100 KiB window: at once.
        let (mut f, mut out) = held_flow(100 << 10, &[1000, 1000]);
        assert!(f.release(&mut out, false));
        assert_eq!(f.credit.unwrap().avail, (100 << 10) - 2000);
        // 32 KiB window: only at the throttle tick, then everything that fits.
        let (mut f, mut out) = held_flow(32 << 10, &[20_000, 10_000, 5_000]);
        assert!(!f.release(&mut out, false));
        assert!(f.release(&mut out, true));
        assert_eq!(f.held.sizes.len(), 1);
        assert_eq!(f.credit.unwrap().avail, (32 << 10) - 30_000);
        // Under 8 KiB of credit: nothing, even at the tick, until credit comes back.
        assert!(!f.release(&mut out, true));
        assert!(f.grant(6_000));
        assert!(f.release(&mut out, true));
        assert!(f.held.sizes.is_empty());
    }

    #[test]
    fn small_windows_and_oversized_messages_never_deadlock() {
        // A 2 KiB window opens when all of it is back, not at 8 KiB.
        let (mut f, mut out) = held_flow(2048, &[1500, 1500]);
        assert!(f.release(&mut out, true));
        assert_eq!(f.held.sizes.len(), 1);
        assert!(!f.release(&mut out, true));
        assert!(f.grant(1500));
        assert!(f.release(&mut out, true));
        // A message larger than the window goes alone once nothing is outstanding.
        let (mut f, mut out) = held_flow(2048, &[100, 5000]);
        assert!(f.release(&mut out, true));
        assert_eq!(f.held.sizes.len(), 1);
        assert!(f.grant(100));
        assert!(f.release(&mut out, true));
        assert_eq!(f.credit.unwrap().avail, 2048 - 5000);
    }

    #[test]
    fn grants_past_the_limit_are_refused() {
        let mut f = Flow::new(false, None, Some(65536));
        assert!(!f.grant(u64::from(crate::config::MAX_WINDOW)));
        assert!(!f.grant(u64::MAX));
        assert!(f.grant(1000));
        assert_eq!(f.credit.unwrap().avail, 66536);
    }

    #[test]
    fn headers_of_every_length_parse() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut b = BytesMut::new();
            write_frame(&mut b, OpCode::Binary, &vec![0; n]);
            assert_eq!(frame_header(&b), Some((2, b.len() - n, n)));
            assert_eq!(frame_header(&b[..b.len() - 1]), None);
        }
    }
}
