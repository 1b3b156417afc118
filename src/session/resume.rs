//! `resume` (SPEC 4 "Resume from last offset"): a client reattaches to a generation of an
//! earlier session — on any instance sharing the store — and gets its messages after `after`,
//! then the live rest, from one source: the log. The state thread replays the log and pushes
//! every later message to the follower; so replay and live tail share one seq space and
//! nothing is sent twice or skipped.
//!
//! When the generation's owner is gone (its lease ran out, or it was released on SIGTERM), the
//! state thread claims it for this instance and the shard adopts it here: the request comes
//! from the log's metadata, the engine re-prefills prompt + logged tokens (sampler position
//! restored), the detokenizer and stop matcher are re-fed without emitting, and the
//! generation continues at the next seq, logging as its first owner did.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::chunker::Chunker;
use super::journal::{Journal, StoredRequest};
use super::json::quoted;
use super::protocol::ProtocolError;
use super::request::{ReqEntry, Sink};
use crate::engine::{EngineMsg, GenerateRequest, SeqKey};
use crate::http::sse;
use crate::server::conn::Conn;
use crate::server::shard::Shard;
use crate::store::thread::{OwnerNote, StoreOp, StoreReply, Who};
use crate::store::{Claimed, GenId};

/// A resumed client waiting on a generation's log.
pub struct Follower {
    pub conn: Rc<Conn>,
    pub id: Box<str>,
    pub gen: GenId,
    asked: Instant,
    answered: bool,
    /// An HTTP view of the log (`None`: a WebSocket `resume`).
    pub http: Option<Box<super::resume_http::HttpFollow>>,
}

impl Follower {
    pub fn new(
        conn: &Rc<Conn>,
        id: &str,
        gen: GenId,
        http: Option<Box<super::resume_http::HttpFollow>>,
    ) -> Self {
        Follower {
            conn: conn.clone(),
            id: id.into(),
            gen,
            asked: Instant::now(),
            answered: false,
            http,
        }
    }
}

/// Handles a `resume` message.
pub fn start(
    shard: &Shard,
    conn: &Rc<Conn>,
    session: String,
    token: String,
    id: String,
    after: u64,
) -> Result<(), ProtocolError> {
    let Some(store) = shard.shared.store.as_ref() else {
        shard.metrics.resume("not_resumable");
        return Err(ProtocolError::new(
            Some(&id),
            "not_resumable",
            "resume is off on this server (--resume false)",
        ));
    };
    let gen = crate::store::gen_id(&session, &id);
    {
        let ws = conn.ws.borrow();
        let Some(ws) = ws.as_ref() else {
            return Err(ProtocolError::new(
                Some(&id),
                "internal_error",
                "no session",
            ));
        };
        if ws.shutting_down {
            return Err(ProtocolError::new(
                Some(&id),
                "shutting_down",
                "the server is shutting down: resume on another instance",
            ));
        }
        if ws.follows.iter().any(|(i, _, _)| **i == *id) || ws.reqs.iter().any(|(i, _)| **i == *id)
        {
            return Err(ProtocolError::new(
                Some(&id),
                "duplicate_id",
                format!("generation {id:?} is already streaming on this connection"),
            ));
        }
        let limit = shard.shared.config.session.max_requests_per_connection;
        if ws.follows.len() + ws.reqs.len() >= limit {
            return Err(ProtocolError::new(
                Some(&id),
                "too_many_requests",
                format!("at most {limit} concurrent generations per connection"),
            ));
        }
    }
    let ticket = shard.journal.ticket(shard.id);
    let op = StoreOp::Follow {
        who: Who {
            shard: shard.id,
            ticket,
            session: session.into(),
            id: id.as_str().into(),
            token_hash: crate::store::token_hash(&token),
        },
        after,
        with_request: false,
        backlogged: conn.backlogged.clone(),
    };
    if !store.send(shard.id, op) {
        shard.metrics.store_drops.inc();
        shard.metrics.resume("store_unavailable");
        return Err(ProtocolError::new(
            Some(&id),
            "store_unavailable",
            "the state queue is full; retry",
        ));
    }
    shard
        .journal
        .followers
        .borrow_mut()
        .insert(ticket, Follower::new(conn, &id, gen.clone(), None));
    if let Some(ws) = conn.ws.borrow_mut().as_mut() {
        ws.follows.push((id.into_boxed_str(), ticket, gen));
    }
    Ok(())
}

/// Ends a follow from the shard's side (its connection closed).
pub fn unfollow(shard: &Shard, ticket: u64) {
    shard.journal.followers.borrow_mut().remove(&ticket);
    if let Some(store) = shard.shared.store.as_ref() {
        if !store.send(shard.id, StoreOp::Unfollow(ticket)) {
            shard.metrics.store_drops.inc();
        }
    }
}

/// `cancel` or `ack` of a followed generation.
pub fn followed_gen(conn: &Conn, id: &str) -> Option<GenId> {
    let ws = conn.ws.borrow();
    ws.as_ref()?
        .follows
        .iter()
        .find(|(i, _, _)| **i == *id)
        .map(|(_, _, g)| g.clone())
}

/// The shard's task for the state thread's answers.
pub async fn replies(shard: Rc<Shard>) {
    let Some(store) = shard.shared.store.clone() else {
        return;
    };
    let Some(b) = store.boxes.get(shard.id as usize).cloned() else {
        return;
    };
    let mut batch = Vec::new();
    loop {
        b.wake.wait().await;
        b.take(&mut batch);
        for r in batch.drain(..) {
            on_reply(&shard, r);
        }
        shard.flush_dirty();
    }
}

fn drop_follower(shard: &Shard, ticket: u64) -> Option<Follower> {
    let f = shard.journal.followers.borrow_mut().remove(&ticket)?;
    if let Some(ws) = f.conn.ws.borrow_mut().as_mut() {
        ws.follows.retain(|(_, t, _)| *t != ticket);
    }
    Some(f)
}

fn on_reply(shard: &Shard, r: StoreReply) {
    match r {
        StoreReply::Refused { ticket, why } | StoreReply::Lost { ticket, why } => {
            let Some(f) = drop_follower(shard, ticket) else {
                return;
            };
            if !f.answered {
                shard.metrics.resume(why.0);
            }
            if f.http.is_some() {
                if !f.conn.is_closing() {
                    super::resume_http::on_refused(shard, &f, ticket, &why);
                }
            } else if !f.conn.is_closing() {
                let e = ProtocolError::new(Some(&f.id), why.0, why.1);
                super::ws::send_error(shard, &f.conn, &e);
            }
        }
        StoreReply::Msgs {
            ticket,
            first_seq,
            msgs,
            done,
            request,
        } => {
            let (conn, id_json) = {
                let mut fs = shard.journal.followers.borrow_mut();
                let Some(f) = fs.get_mut(&ticket) else { return };
                if !f.answered {
                    f.answered = true;
                    shard.metrics.resume("ok");
                    shard.metrics.resume_latency.observe(f.asked.elapsed());
                }
                if f.http.is_some() {
                    if f.conn.is_closing() {
                        return;
                    }
                    let over = super::resume_http::on_msgs(
                        shard, f, ticket, first_seq, &msgs, done, request,
                    );
                    shard.metrics.deltas_out.add(msgs.len() as u64);
                    drop(fs);
                    if over {
                        super::resume_http::forget(shard, ticket);
                    }
                    return;
                }
                (f.conn.clone(), quoted(&f.id))
            };
            if done {
                drop_follower(shard, ticket);
            }
            if conn.is_closing() {
                return;
            }
            {
                let buf = &mut conn.out.borrow_mut().buf;
                for (seq, m) in (first_seq..).zip(&msgs) {
                    super::journal::render(buf, &id_json, seq, m);
                }
            }
            shard.metrics.deltas_out.add(msgs.len() as u64);
            shard.mark_dirty(&conn);
        }
        StoreReply::Adopt {
            ticket,
            gen,
            claimed,
        } => adopt(shard, ticket, gen, claimed),
        StoreReply::Owner { key, what } => on_owner_note(shard, key, what),
        StoreReply::Started { key, ok } => super::request_http::on_stored(shard, key, ok),
        StoreReply::Snapshot { ticket, result } => {
            super::resume_http::on_snapshot(shard, ticket, result)
        }
        StoreReply::Deleted { ticket, result } => {
            super::resume_http::on_deleted(shard, ticket, result)
        }
    }
}

fn on_owner_note(shard: &Shard, key: SeqKey, what: OwnerNote) {
    let mut reqs = shard.requests.borrow_mut();
    let Some(e) = reqs.get_mut(key.slot as usize).filter(|e| e.key == key) else {
        return;
    };
    let Some(j) = e.journal.as_mut() else {
        return;
    };
    match what {
        OwnerNote::Fenced => {
            if j.stopped {
                return;
            }
            j.stopped = true;
            tracing::info!(
                shard = shard.id,
                gen = &*j.gen,
                "generation taken over elsewhere: stopping"
            );
            let live = j.detached.is_none() && !e.conn.is_closing();
            let conn = e.conn.clone();
            let id = e.id.clone();
            if let Sink::Http(h) = &e.sink {
                // Its HTTP client is told where the rest is, as the stream's last event.
                if live && h.stream && h.started {
                    let mut out = conn.out.borrow_mut();
                    sse::write_stream_error(
                        &mut out.buf,
                        "moved",
                        "another instance carries this generation on now; read it back there",
                    );
                }
                drop(reqs);
                shard.mark_dirty(&conn);
                shard.send_control(EngineMsg::Cancel(key));
                return;
            }
            drop(reqs);
            if live {
                let err = ProtocolError::new(
                    Some(&id),
                    "moved",
                    "another instance carries this generation on now; resume it there",
                );
                super::ws::send_error(shard, &conn, &err);
            }
            shard.send_control(EngineMsg::Cancel(key));
        }
        OwnerNote::Unsafe => {
            if j.logging() {
                tracing::warn!(
                    shard = shard.id,
                    gen = &*j.gen,
                    "log write failed: not resumable"
                );
            }
            j.broken = true;
        }
        OwnerNote::Cancel => {
            drop(reqs);
            shard.send_control(EngineMsg::Cancel(key));
        }
        OwnerNote::Watched => {
            if j.detached.is_some() {
                j.detached = Some(Instant::now());
            }
        }
    }
}

/// Carries on a generation this instance just claimed for follower `ticket`.
fn adopt(shard: &Shard, ticket: u64, gen: GenId, claimed: Claimed) {
    if shard.draining.get() {
        // Claimed while this instance drains: hand it straight back, so that the instance the
        // client reconnects to claims at once instead of waiting for the lease; and end the
        // follow here (else its next read would claim it again).
        if let Some(store) = shard.shared.store.as_ref() {
            let lease = crate::store::Lease {
                gen,
                epoch: claimed.epoch,
            };
            if !store.send(shard.id, StoreOp::Release(vec![lease])) {
                shard.metrics.store_drops.inc();
            }
            if !store.send(shard.id, StoreOp::Unfollow(ticket)) {
                shard.metrics.store_drops.inc();
            }
        }
        if let Some(f) = drop_follower(shard, ticket) {
            if f.http.is_none() && !f.conn.is_closing() {
                let e = ProtocolError::new(
                    Some(&f.id),
                    "shutting_down",
                    "the server is shutting down: resume on another instance",
                );
                super::ws::send_error(shard, &f.conn, &e);
            }
        }
        return;
    }
    let (conn, cancel) = match shard.journal.followers.borrow().get(&ticket) {
        Some(f) => (
            f.conn.clone(),
            f.http.as_ref().is_some_and(|h| h.cancel_on_adopt),
        ),
        None => match shard.journal.reads.borrow().get(&ticket) {
            // A read found it orphaned (a background response nobody streams).
            Some(r) => (r.conn.clone(), false),
            // The follower left already: the lease runs out again and the next resume claims.
            None => return,
        },
    };
    let req: StoredRequest = match serde_json::from_slice(&claimed.request) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                gen = &*gen,
                "cannot take over: stored request unreadable: {e}"
            );
            return;
        }
    };
    let now = Instant::now();
    let mut detok = shard.shared.codec.detok(&req.stop);
    for &t in &claimed.tokens {
        let _ = detok.push(t);
    }
    let stopped = detok.stopped() || cancel;
    let background = req.http.as_ref().is_some_and(|h| h.background);
    let mut journal = Journal::new(gen.clone(), claimed.epoch, Some(now), claimed.log.clone());
    journal.background = background;
    let entry = ReqEntry {
        key: SeqKey {
            shard: shard.id,
            slot: 0,
            gen: 0,
        },
        conn,
        id_json: quoted(&req.id).into_boxed_str(),
        id: req.id.as_str().into(),
        mode: req.stream_mode(),
        detok,
        seq: claimed.last_seq,
        tokens: claimed.tokens.len() as u32,
        prompt_tokens: req.prompt.len() as u32,
        arrived: now,
        first_token: None,
        last_token: now,
        chunker: Chunker::default(),
        sink: Sink::Ws,
        stop_hit: stopped,
        scratch: String::new(),
        // Logprobs are not carried over a takeover (documented in docs/protocol.md).
        logprobs: None,
        // A takeover is not charged to the tenant again (the first owner charged it).
        charge: None,
        tenant: None,
        journal: Some(journal),
    };
    let key = shard.insert_request(entry);
    let ntok = claimed.tokens.len();
    let mut params = req.params;
    params.logprobs = None;
    let msg = EngineMsg::Generate(Box::new(GenerateRequest {
        key,
        prompt: req.prompt,
        params,
        generated: claimed.tokens,
    }));
    if shard.link.borrow_mut().send(msg).is_err() {
        shard.requests.borrow_mut().try_remove(key.slot as usize);
        tracing::warn!(gen = &*gen, "cannot take over: engine queue full");
        return;
    }
    if stopped {
        shard.send_control(EngineMsg::Cancel(key));
    }
    shard.metrics.takeovers.inc();
    tracing::info!(
        shard = shard.id,
        gen = &*gen,
        epoch = claimed.epoch,
        tokens = ntok,
        seq = claimed.last_seq,
        "took over a generation whose owner is gone"
    );
}

/// Appends the request blob a new owner needs; `None` when it cannot be serialized.
pub fn stored_request(req: &StoredRequest) -> Option<bytes::Bytes> {
    serde_json::to_vec(req).ok().map(bytes::Bytes::from)
}

/// A shared instance name, for the store's `own` field.
pub fn instance(shard: &Shard) -> Arc<str> {
    shard
        .shared
        .store
        .as_ref()
        .map_or_else(|| Arc::from(""), |s| s.instance.clone())
}
