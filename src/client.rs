//! seedance-client (SPEC 7): a blocking WebSocket client that streams one generation and
//! survives dropped connections — it reconnects with exponential backoff and full jitter,
//! resumes after the last seq it saw (on whatever instance the URL reaches now), and acks.
//!
//! Every delta is handed over exactly once and in order: seqs are checked, a duplicate is
//! dropped, a gap is an error (the server promises neither happens; the client verifies).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rand::Rng;
use serde_json::{json, Value};

use crate::ws::codec::{Decoder, Message};
use crate::ws::frame::{write_frame_masked, Limits, OpCode, Role};

/// What one chat needs.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// `ws://host:port/path?query`.
    pub url: String,
    /// The `generate` message fields besides `type` and `id` (prompt, max_tokens, ...).
    pub request: Value,
    pub id: String,
    /// Reconnect attempts in a row without progress before giving up.
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// No message (not even a PING) for this long: the connection is dead, reconnect.
    pub read_timeout: Duration,
    /// Ack every this many deltas (and the done), so the server may trim the log.
    pub ack_every: u64,
}

impl ChatOptions {
    pub fn new(url: &str, request: Value) -> Self {
        ChatOptions {
            url: url.to_owned(),
            request,
            id: "c1".into(),
            max_retries: 12,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            read_timeout: Duration::from_secs(45),
            ack_every: 64,
        }
    }
}

/// What the caller sees, in order.
pub enum Event<'a> {
    /// Any message from the server, as parsed (for `--json`).
    Message(&'a Value),
    /// The next delta's text (exactly once per seq).
    Text(&'a str),
    /// The connection dropped; reconnecting after `delay`, resuming after `after`.
    Reconnecting {
        attempt: u32,
        after: u64,
        delay: Duration,
        why: &'a str,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad url {0:?}: expected ws://host[:port]/path")]
    BadUrl(String),
    #[error("server refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("gave up after {attempts} reconnect attempts: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
}

struct Url {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, ClientError> {
    let bad = || ClientError::BadUrl(url.to_owned());
    let rest = url.strip_prefix("ws://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/chat"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url {
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

/// One WebSocket connection (client side, masked frames).
struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
    dec: Decoder,
}

impl Conn {
    fn open(url: &Url, read_timeout: Duration) -> std::io::Result<Conn> {
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("host has no address"))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(read_timeout))?;
        let mut key = [0u8; 16];
        rand::rng().fill(&mut key);
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             User-Agent: seedance-client\r\n\r\n",
            url.path, url.host, url.port
        );
        let mut c = Conn {
            tcp,
            buf: BytesMut::with_capacity(16 * 1024),
            dec: Decoder::new(Role::Client, Limits::default()),
        };
        c.tcp.write_all(req.as_bytes())?;
        let end = loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            c.fill()?;
        };
        let head = String::from_utf8_lossy(&c.buf[..end]).into_owned();
        let want = crate::ws::handshake::accept_key(key.as_bytes());
        let accepted = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("sec-websocket-accept") && v.trim().as_bytes() == want
            })
        });
        if !head.starts_with("HTTP/1.1 101") || !accepted {
            let first = head.lines().next().unwrap_or("").to_owned();
            return Err(std::io::Error::other(format!("handshake refused: {first}")));
        }
        c.buf.advance(end);
        Ok(c)
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.tcp.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn send(&mut self, op: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let mut f = BytesMut::with_capacity(payload.len() + 14);
        let mut mask = [0u8; 4];
        rand::rng().fill(&mut mask);
        write_frame_masked(&mut f, op, payload, mask);
        self.tcp.write_all(&f)
    }

    fn send_json(&mut self, v: &Value) -> std::io::Result<()> {
        self.send(OpCode::Text, v.to_string().as_bytes())
    }

    /// The next text message (control frames answered on the way).
    fn next(&mut self) -> std::io::Result<Value> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(Message::Text(t))) => {
                    return serde_json::from_slice(&t)
                        .map_err(|e| std::io::Error::other(format!("bad JSON: {e}")));
                }
                Ok(Some(Message::Ping(p))) => self.send(OpCode::Pong, &p)?,
                Ok(Some(Message::Close(c))) => {
                    let code = c.map_or(1005, |(code, _)| code.0);
                    let _ = self.send(OpCode::Close, &code.to_be_bytes());
                    return Err(std::io::Error::other(format!("closed by server ({code})")));
                }
                Ok(Some(_)) => {}
                Ok(None) => self.fill()?,
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
    }
}

/// Codes after which a retry can help.
fn transient(code: &str) -> bool {
    matches!(code, "store_unavailable" | "overloaded" | "shutting_down")
}

/// Full jitter: uniform in [0, min(max, base·2^attempt)].
fn backoff(o: &ChatOptions, attempt: u32) -> Duration {
    let cap = o
        .backoff_base
        .saturating_mul(1u32 << attempt.min(16))
        .min(o.backoff_max);
    cap.mul_f64(rand::rng().random::<f64>())
}

enum Ended {
    Done(Value),
    Dropped(String),
}

/// Streams one generation to `on_event`; returns its `done` message.
pub fn chat(o: &ChatOptions, mut on_event: impl FnMut(Event)) -> Result<Value, ClientError> {
    let url = parse_url(&o.url)?;
    let mut resume: Option<(String, String)> = None;
    let mut last_seq = 0u64;
    let mut attempt = 0u32;
    loop {
        let before = last_seq;
        let ended = match Conn::open(&url, o.read_timeout) {
            Ok(mut c) => run_once(o, &mut c, &mut resume, &mut last_seq, &mut on_event)?,
            Err(e) => Ended::Dropped(e.to_string()),
        };
        let why = match ended {
            Ended::Done(done) => return Ok(done),
            Ended::Dropped(why) => why,
        };
        if last_seq > before {
            attempt = 0;
        }
        attempt += 1;
        if attempt > o.max_retries {
            return Err(ClientError::GaveUp {
                attempts: attempt - 1,
                last: why,
            });
        }
        let delay = backoff(o, attempt);
        on_event(Event::Reconnecting {
            attempt,
            after: last_seq,
            delay,
            why: &why,
        });
        std::thread::sleep(delay);
    }
}

/// One connection's life: `generate` (first time) or `resume`, then messages until the done
/// or a drop.
fn run_once(
    o: &ChatOptions,
    c: &mut Conn,
    resume: &mut Option<(String, String)>,
    last_seq: &mut u64,
    on_event: &mut impl FnMut(Event),
) -> Result<Ended, ClientError> {
    macro_rules! io {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Ok(Ended::Dropped(e.to_string())),
            }
        };
    }
    let hello = io!(c.next());
    on_event(Event::Message(&hello));
    match resume.as_ref() {
        None => {
            let (Some(s), Some(t)) = (hello["session"].as_str(), hello["token"].as_str()) else {
                return Err(ClientError::Protocol(
                    "no session in the first message".into(),
                ));
            };
            *resume = Some((s.to_owned(), t.to_owned()));
            let mut g = o.request.clone();
            g["type"] = "generate".into();
            g["id"] = o.id.as_str().into();
            io!(c.send_json(&g));
        }
        Some((session, token)) => {
            let r = json!({"type": "resume", "session": session, "token": token,
                           "id": o.id, "after": *last_seq});
            io!(c.send_json(&r));
        }
    }
    loop {
        let m = io!(c.next());
        on_event(Event::Message(&m));
        match m["type"].as_str() {
            Some("delta") if m["id"] == o.id.as_str() => {
                let seq = m["seq"].as_u64().unwrap_or(0);
                if seq <= *last_seq {
                    continue; // never expected; dropped rather than shown twice
                }
                if seq != *last_seq + 1 {
                    return Err(ClientError::Protocol(format!(
                        "seq {seq} after {}: a gap",
                        *last_seq
                    )));
                }
                *last_seq = seq;
                on_event(Event::Text(m["text"].as_str().unwrap_or("")));
                if o.ack_every > 0 && seq.is_multiple_of(o.ack_every) {
                    io!(c.send_json(&json!({"type": "ack", "id": o.id, "seq": seq})));
                }
            }
            Some("done") if m["id"] == o.id.as_str() => {
                let seq = m["seq"].as_u64().unwrap_or(0);
                let _ = c.send_json(&json!({"type": "ack", "id": o.id, "seq": seq}));
                let _ = c.send(OpCode::Close, &1000u16.to_be_bytes());
                return Ok(Ended::Done(m));
            }
            Some("error") => {
                let code = m["code"].as_str().unwrap_or("error").to_owned();
                if *last_seq == 0
                    && resume.is_some()
                    && matches!(code.as_str(), "unknown_session" | "unknown_id")
                {
                    // The generate never reached the store (its instance went away first):
                    // start over on the next connection.
                    *resume = None;
                    return Ok(Ended::Dropped(code));
                }
                if transient(&code) {
                    return Ok(Ended::Dropped(code));
                }
                return Err(ClientError::Refused {
                    code,
                    message: m["message"].as_str().unwrap_or("").to_owned(),
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("ws://127.0.0.1:8080/v1/chat?stream_mode=chunk").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/v1/chat?stream_mode=chunk")
        );
        assert_eq!(parse_url("ws://h").expect("url").path, "/v1/chat");
        assert!(parse_url("http://h/").is_err());
        assert!(parse_url("ws://:80/").is_err());
        assert!(parse_url("ws://h:99999/").is_err());
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        let o = ChatOptions::new("ws://h", json!({}));
        for attempt in 0..40 {
            let d = backoff(&o, attempt);
            let cap = o
                .backoff_base
                .saturating_mul(1 << attempt.min(16))
                .min(o.backoff_max);
            assert!(d <= cap, "{d:?} > {cap:?}");
        }
        // Jitter: not always the cap.
        let ds: Vec<_> = (0..20).map(|_| backoff(&o, 5)).collect();
        assert!(ds.iter().any(|d| *d != ds[0]));
    }
}
