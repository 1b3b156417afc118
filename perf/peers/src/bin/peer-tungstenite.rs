//! `peer-tungstenite`: the null model's WebSocket streaming over tokio + tokio-tungstenite, as a
//! baseline for seedance (SPEC 7; perf/peers.sh).
//!
//! One task per connection on a multi-thread runtime. By default each delta is one
//! `SinkExt::send`, which writes and flushes the frame: one write per delta, as a token streamer
//! that wants every token on the wire at once is usually written with this library. With
//! `--coalesce` each delta is `SinkExt::feed` into tungstenite's own write buffer (128 KiB by
//! default) and the generation is flushed once after its `done`: the library's documented way to
//! batch, here at its limit (a 256-token generation is one write), to show how much of a gap
//! is write coalescing.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use seedance_peers::{check_request, handle_text, session_message, Action, Flags};

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    flags: Flags,
    /// Queue deltas in tungstenite's write buffer and flush once per generation.
    #[arg(long)]
    coalesce: bool,
}
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{self, Message};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let args = Args::parse();
    let rt = match seedance_peers::runtime(args.flags.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer-tungstenite: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(args)) {
        eprintln!("peer-tungstenite: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let coalesce = args.coalesce;
    let listener = TcpListener::bind(args.flags.listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors and the like: keep serving the connections already open.
            Err(e) => {
                eprintln!("peer-tungstenite: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection(stream, coalesce).await {
                if !matches!(
                    e,
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::Protocol(_)
                ) {
                    eprintln!("peer-tungstenite: connection: {e}");
                }
            }
        });
    }
}

/// The handshake checks seedance makes that the bench relies on; a refusal answers with
/// seedance's status and JSON body.
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
fn on_request(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    match check_request(req) {
        Ok(()) => Ok(resp),
        Err(r) => {
            let mut err = ErrorResponse::new(Some(r.body));
            *err.status_mut() =
                http::StatusCode::from_u16(r.status).unwrap_or(http::StatusCode::BAD_REQUEST);
            Err(err)
        }
    }
}

async fn connection(stream: TcpStream, coalesce: bool) -> Result<(), tungstenite::Error> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, on_request).await?;
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
    ws.send(Message::text(session_message(n))).await?;
    // Pings are answered and a close is echoed by tungstenite itself, on the next read or write;
    // after a close the stream ends.
    while let Some(msg) = ws.next().await {
        let text = match msg? {
            Message::Text(t) => t,
            Message::Binary(_) => {
                let e = seedance_peers::error_message(
                    None,
                    "binary_not_supported",
                    "messages are JSON text frames",
                );
                ws.send(Message::text(e)).await?;
                continue;
            }
            _ => continue,
        };
        match handle_text(text.as_bytes()) {
            Action::Reply(r) => ws.send(Message::text(r)).await?,
            Action::Generate(mut g) => {
                loop {
                    let mut delta = String::with_capacity(96);
                    if !g.write_next(&mut delta) {
                        break;
                    }
                    if coalesce {
                        ws.feed(Message::text(delta)).await?;
                    } else {
                        ws.send(Message::text(delta)).await?;
                    }
                }
                ws.send(Message::text(g.done())).await?;
            }
        }
    }
    Ok(())
}
