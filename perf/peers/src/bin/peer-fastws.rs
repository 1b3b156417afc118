//! `peer-fastws`: the null model's WebSocket streaming over tokio + hyper 1 + fastwebsockets, as
//! a baseline for seedance (SPEC 7; perf/peers.sh).
//!
//! Structured as fastwebsockets' README server: hyper serves HTTP/1.1 per connection with
//! upgrades, `fastwebsockets::upgrade::upgrade` answers the handshake, and the WebSocket runs in
//! its own task under `tokio::task::unconstrained`, through a `FragmentCollector` (auto pong and
//! auto close on, the defaults). Each delta is one `write_frame`, which writes the frame to the
//! socket at once (fastwebsockets does not buffer writes): one write per delta.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use fastwebsockets::{upgrade, FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use seedance_peers::{check_request, error_message, handle_text, session_message, Action, Flags};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let flags = Flags::parse();
    let rt = match seedance_peers::runtime(flags.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer-fastws: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(flags)) {
        eprintln!("peer-fastws: {e}");
        std::process::exit(1);
    }
}

async fn serve(flags: Flags) -> std::io::Result<()> {
    let listener = TcpListener::bind(flags.listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors and the like: keep serving the connections already open.
            Err(e) => {
                eprintln!("peer-fastws: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if stream.set_nodelay(true).is_err() {
                return;
            }
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(upgrade_request))
                .with_upgrades();
            // Errors here are clients that went away mid-handshake.
            let _ = conn.await;
        });
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The handshake: seedance's checks first, then fastwebsockets' upgrade; the WebSocket itself
/// runs in a task of its own once hyper has sent the `101`.
async fn upgrade_request(
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if let Err(r) = check_request(&req) {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(plain(status, r.body));
    }
    let (resp, fut) = match upgrade::upgrade(&mut req) {
        Ok(u) => u,
        Err(e) => {
            let body = serde_json::json!({"error": {"code": "bad_upgrade",
                "message": e.to_string(), "type": "invalid_request_error", "param": null}});
            return Ok(plain(StatusCode::BAD_REQUEST, body.to_string()));
        }
    };
    tokio::spawn(async move {
        if let Err(e) = tokio::task::unconstrained(websocket(fut)).await {
            if !matches!(
                e,
                WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF
            ) {
                eprintln!("peer-fastws: connection: {e}");
            }
        }
    });
    Ok(resp.map(|_| Full::default()))
}

async fn send_text(
    ws: &mut FragmentCollector<TokioIo<hyper::upgrade::Upgraded>>,
    text: &str,
) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
}

async fn websocket(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
    send_text(&mut ws, &session_message(n)).await?;
    let mut delta = String::with_capacity(96);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            // fastwebsockets has already echoed the close.
            OpCode::Close => return Ok(()),
            OpCode::Text => {}
            OpCode::Binary => {
                let e = error_message(
                    None,
                    "binary_not_supported",
                    "messages are JSON text frames",
                );
                send_text(&mut ws, &e).await?;
                continue;
            }
            _ => continue,
        }
        match handle_text(&frame.payload) {
            Action::Reply(r) => send_text(&mut ws, &r).await?,
            Action::Generate(mut g) => {
                while g.write_next(&mut delta) {
                    send_text(&mut ws, &delta).await?;
                    delta.clear();
                }
                send_text(&mut ws, &g.done()).await?;
            }
        }
    }
}
