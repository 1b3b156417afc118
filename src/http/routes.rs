//! Plain HTTP routes on the shared port: health, readiness, models, metrics, and the upgrade
//! endpoint. Each handler writes a complete response; the return value says "close after".

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::conn::RequestInfo;
use super::error::HttpError;
use super::request::Head;
use super::response::{write_head, write_response};
use crate::config::Mode;
use crate::server::shard::Shard;

/// The WebSocket endpoint.
pub const WS_PATH: &str = "/v1/chat";

/// Routes, for 404 vs 405 decisions.
pub enum Route {
    Health,
    Ready,
    Models,
    Metrics,
    Index,
}

/// Whether the request is aimed at the WebSocket endpoint (validated by the handshake code,
/// which answers every malformed upgrade with a status and a JSON body).
pub fn is_upgrade(shard: &Shard, head: &Head<'_>) -> bool {
    head.path == WS_PATH && shard.shared.config.server.mode != Mode::Http
}

fn find(path: &str) -> Option<(Route, &'static str)> {
    Some(match path {
        "/health" => (Route::Health, "GET, HEAD"),
        "/ready" => (Route::Ready, "GET, HEAD"),
        "/v1/models" => (Route::Models, "GET, HEAD"),
        "/metrics" => (Route::Metrics, "GET, HEAD"),
        "/" => (Route::Index, "GET, HEAD"),
        _ => return None,
    })
}

/// Answers one request into `out`; returns true when the connection must close.
pub fn handle(shard: &Shard, req: &RequestInfo, _body: &[u8], out: &mut BytesMut) -> bool {
    let Some((route, allow)) = find(&req.path) else {
        let e = HttpError::NotFound(req.path.clone());
        e.write(out);
        return e.closes();
    };
    if req.method != "GET" && req.method != "HEAD" {
        let e = HttpError::MethodNotAllowed(allow);
        e.write(out);
        return e.closes();
    }
    let head_only = req.method == "HEAD";
    let shared = &shard.shared;
    let (status, ctype, body): (u16, &str, Vec<u8>) = match route {
        Route::Health => (200, "application/json", br#"{"status":"ok"}"#.to_vec()),
        Route::Ready => {
            if shared.shutdown.load(Ordering::Acquire) {
                // SIGTERM: out of the pool first (for `drain_delay_ms` the instance still
                // accepts), then the listener closes and running generations drain.
                HttpError::Draining.write(out);
                return false;
            } else if shared.ready.load(Ordering::Acquire) {
                let mut v = serde_json::json!({"status": "ready", "model": shared.models.first()});
                // The store's health is reported, not gated on: every instance shares the
                // store, so taking them out of rotation would turn a resume outage into a full
                // outage (live streams do not need the store).
                if let Some(st) = &shared.store {
                    let up = st.healthy.load(Ordering::Acquire);
                    v["store"] = serde_json::json!({"kind": st.kind,
                        "status": if up { "ok" } else { "unavailable" }, "instance": &*st.instance});
                }
                (200, "application/json", v.to_string().into_bytes())
            } else {
                HttpError::NotReady.write(out);
                return false;
            }
        }
        Route::Models => {
            let data: Vec<_> = shared
                .models
                .iter()
                .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "seedance"}))
                .collect();
            let v = serde_json::json!({"object": "list", "data": data});
            (200, "application/json", v.to_string().into_bytes())
        }
        Route::Metrics => (
            200,
            "text/plain; version=0.0.4",
            shared.registry.render().into_bytes(),
        ),
        Route::Index => {
            if shared.config.server.mode == Mode::Http {
                (
                    200,
                    "text/plain",
                    b"seedance: WebSocket disabled (--mode http)\n".to_vec(),
                )
            } else {
                (
                    200,
                    "text/html; charset=utf-8",
                    INDEX_HTML.as_bytes().to_vec(),
                )
            }
        }
    };
    if head_only {
        // A HEAD response carries the GET's length but no body (RFC 9110 §9.3.2).
        write_head(out, status, ctype, body.len());
    } else {
        write_response(out, status, ctype, &[], &body, !req.keep_alive);
    }
    false
}

/// The small chat page of SPEC 5 (chats over the WebSocket protocol, shows TTFT and tokens/s).
const INDEX_HTML: &str = include_str!("../../web/index.html");
