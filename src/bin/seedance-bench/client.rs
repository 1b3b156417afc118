//! The two client protocols the load generator speaks: WebSocket (`/v1/chat`) and OpenAI SSE
//! (`/v1/completions`, `stream: true`), each measuring one request's timings.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use seedance::ws::codec::{Decoder, Message};
use seedance::ws::deflate;
use seedance::ws::frame::{write_frame_masked, Limits, OpCode, Role};

/// One request's measurements.
#[derive(Default, Debug)]
pub struct Sample {
    pub sent: Option<Instant>,
    pub first: Option<Instant>,
    pub end: Option<Instant>,
    /// Arrival times of the deltas after the first (for ITL).
    pub gaps: Vec<f64>,
    pub deltas: u64,
    pub tokens: u64,
    /// Bytes read from the socket while this request ran.
    pub wire_bytes: u64,
    pub error: Option<String>,
}

impl Sample {
    fn delta(&mut self, now: Instant, last: &mut Instant) {
        match self.first {
            None => self.first = Some(now),
            Some(_) => self.gaps.push(now.duration_since(*last).as_secs_f64()),
        }
        *last = now;
        self.deltas += 1;
    }
}

thread_local! {
    /// The TLS client configuration every new connection uses (`--tls-ca`), if any.
    static TLS: std::cell::RefCell<Option<std::sync::Arc<rustls::ClientConfig>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes every connection of this thread speak TLS, trusting the certificates in `ca` (PEM);
/// `resume`: keep session tickets and resume with them.
pub fn use_tls(ca: &std::path::Path, resume: bool) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    #[allow(deprecated)] // ring: see src/server/tls.rs (also for the key exchange order)
    let provider = std::sync::Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: seedance::server::tls::KX_GROUPS.to_vec(),
        ..rustls::crypto::ring::default_provider()
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    TLS.with(|t| *t.borrow_mut() = Some(std::sync::Arc::new(config)));
    Ok(())
}

/// A keep-alive connection of either protocol.
pub struct Client {
    stream: TcpStream,
    /// TLS session and the ciphertext read but not yet given to it.
    tls: Option<rustls::ClientConnection>,
    cbuf: BytesMut,
    buf: BytesMut,
    ws: Option<Decoder>,
    addr: SocketAddr,
    /// zstd stream of a connection that asked for compression (binary frames).
    zstd: Option<zstd_safe::DCtx<'static>>,
    plain: Vec<u8>,
    /// Messages of a compressed frame not handled yet.
    decoded: std::collections::VecDeque<bytes::Bytes>,
    /// Bytes read from the socket so far.
    pub read_bytes: u64,
}

impl Client {
    async fn tcp(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_addr(addr).await?;
        stream.set_nodelay(true)?;
        let tls = match TLS.with(|t| t.borrow().clone()) {
            None => None,
            Some(config) => {
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                Some(rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?)
            }
        };
        let mut c = Client {
            stream,
            tls,
            cbuf: BytesMut::new(),
            buf: BytesMut::with_capacity(64 * 1024),
            ws: None,
            addr,
            zstd: None,
            plain: Vec::new(),
            decoded: Default::default(),
            read_bytes: 0,
        };
        c.handshake().await?;
        Ok(c)
    }

    /// Completes the TLS handshake (nothing to do without TLS).
    async fn handshake(&mut self) -> std::io::Result<()> {
        loop {
            self.flush_tls().await?;
            match self.tls.as_ref() {
                Some(t) if t.is_handshaking() => {}
                _ => return Ok(()),
            }
            self.read_cipher().await?;
        }
    }

    /// Sends what the TLS session has queued.
    async fn flush_tls(&mut self) -> std::io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            let (res, _) = self.stream.write_all(out).await;
            res?;
        }
        Ok(())
    }

    /// Reads ciphertext from the socket and gives it to the TLS session.
    async fn read_cipher(&mut self) -> std::io::Result<()> {
        use monoio::buf::IoBufMut;
        self.cbuf.reserve(16 * 1024);
        let (len, cap) = (self.cbuf.len(), self.cbuf.capacity());
        let owned = std::mem::take(&mut self.cbuf);
        let (res, slice) = self.stream.read(owned.slice_mut(len..cap)).await;
        self.cbuf = slice.into_inner();
        let n = res?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.read_bytes += n as u64;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while !self.cbuf.is_empty() {
            let mut rd: &[u8] = &self.cbuf;
            let used = tls.read_tls(&mut rd)?;
            self.cbuf.advance(used);
            tls.process_new_packets().map_err(std::io::Error::other)?;
            if used == 0 {
                break;
            }
        }
        Ok(())
    }

    pub async fn http(addr: SocketAddr) -> std::io::Result<Client> {
        Self::tcp(addr).await
    }

    /// Opens `/v1/chat{query}`; `compression`: `none`, `zstd` (asked in the query) or `deflate`
    /// (permessage-deflate offered as browsers do). Fails when compression is not granted.
    pub async fn websocket(
        addr: SocketAddr,
        query: &str,
        compression: &str,
    ) -> std::io::Result<Client> {
        let mut c = Self::tcp(addr).await?;
        let zstd = compression == "zstd";
        let deflate = compression == "deflate";
        let mut target = format!("/v1/chat{query}");
        if zstd {
            target.push(if query.is_empty() { '?' } else { '&' });
            target.push_str("compression=zstd");
        }
        let offer = if deflate {
            format!("Sec-WebSocket-Extensions: {}\r\n", deflate::CLIENT_OFFER)
        } else {
            String::new()
        };
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        c.write(req.into_bytes()).await?;
        let end = c.head_end().await?;
        let head = String::from_utf8_lossy(&c.buf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(std::io::Error::other(head));
        }
        let header = |name: &str| {
            head.split("\r\n").find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        if zstd && header("x-compression").as_deref() != Some("zstd") {
            return Err(std::io::Error::other("the server did not grant zstd"));
        }
        let mut dec = Decoder::new(Role::Client, Limits::default());
        if deflate {
            let answer = header("sec-websocket-extensions").ok_or_else(|| {
                std::io::Error::other("the server did not accept permessage-deflate")
            })?;
            let p = deflate::parse_response(answer.as_bytes()).map_err(std::io::Error::other)?;
            dec = dec.with_deflate(!p.server_no_context_takeover);
        }
        c.buf.advance(end);
        c.ws = Some(dec);
        c.zstd = zstd.then(zstd_safe::DCtx::create);
        Ok(c)
    }

    async fn write(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            use std::io::Write;
            tls.writer().write_all(&bytes)?;
            return self.flush_tls().await;
        }
        let (res, _) = self.stream.write_all(bytes).await;
        res.map(|_| ())
    }

    pub async fn read(&mut self) -> std::io::Result<()> {
        use monoio::buf::IoBufMut;
        if self.tls.is_some() {
            // Ciphertext in, plaintext appended to `buf`, until some plaintext arrived.
            loop {
                self.read_cipher().await?;
                self.flush_tls().await?;
                let Some(tls) = self.tls.as_mut() else {
                    return Ok(());
                };
                let mut got = 0;
                loop {
                    let len = self.buf.len();
                    self.buf.resize(len + 16 * 1024, 0);
                    let r = std::io::Read::read(&mut tls.reader(), &mut self.buf[len..]);
                    let n = match r {
                        Ok(0) => {
                            // close_notify: the peer is done (after what was read so far).
                            self.buf.truncate(len);
                            if got > 0 {
                                return Ok(());
                            }
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                        Err(e) => {
                            self.buf.truncate(len);
                            return Err(e);
                        }
                    };
                    self.buf.truncate(len + n);
                    got += n;
                    if n == 0 {
                        break;
                    }
                }
                if got > 0 {
                    return Ok(());
                }
            }
        }
        self.buf.reserve(64 * 1024);
        let (len, cap) = (self.buf.len(), self.buf.capacity());
        let owned = std::mem::take(&mut self.buf);
        let (res, slice) = self.stream.read(owned.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        match res? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.read_bytes += n as u64;
                Ok(())
            }
        }
    }

    /// Reads until a complete HTTP head is buffered; returns its length.
    async fn head_end(&mut self) -> std::io::Result<usize> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(i + 4);
            }
            self.read().await?;
        }
    }

    async fn send_ws(&mut self, op: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let mut f = BytesMut::with_capacity(payload.len() + 14);
        write_frame_masked(&mut f, op, payload, [1, 2, 3, 4]);
        self.write(f.to_vec()).await
    }

    /// One WebSocket generation: `generate`, deltas, `done`.
    pub async fn ws_request(&mut self, body: &str) -> Sample {
        let mut s = Sample::default();
        let sent = Instant::now();
        s.sent = Some(sent);
        if let Err(e) = self.send_ws(OpCode::Text, body.as_bytes()).await {
            s.error = Some(e.to_string());
            return s;
        }
        let mut last = sent;
        let read_before = self.read_bytes;
        let mut s = self.ws_messages(s, &mut last).await;
        s.wire_bytes = self.read_bytes - read_before;
        s
    }

    /// Decodes one zstd binary frame (the stream carries over between frames).
    fn inflate(&mut self, frame: &[u8]) -> Result<(), String> {
        let Some(d) = self.zstd.as_mut() else {
            return Err("binary frame on a plain connection".into());
        };
        self.plain.clear();
        let mut input = zstd_safe::InBuffer::around(frame);
        loop {
            self.plain.reserve(4 * frame.len() + 256);
            let pos = self.plain.len();
            let mut out = zstd_safe::OutBuffer::around_pos(&mut self.plain, pos);
            d.decompress_stream(&mut out, &mut input)
                .map_err(|c| format!("zstd: {}", zstd_safe::get_error_name(c)))?;
            // Done when all input is in and zstd did not stop for lack of room.
            let full = out.pos() == out.capacity();
            if input.pos() == frame.len() && !full {
                return Ok(());
            }
        }
    }

    async fn ws_messages(&mut self, mut s: Sample, last: &mut Instant) -> Sample {
        loop {
            let Some(dec) = self.ws.as_mut() else {
                s.error = Some("not a websocket".into());
                return s;
            };
            let msg = if let Some(m) = self.decoded.pop_front() {
                Ok(Some(Message::Text(m)))
            } else {
                match dec.decode(&mut self.buf) {
                    Ok(Some(Message::Binary(b))) => {
                        if let Err(e) = self.inflate(&b) {
                            s.error = Some(e);
                            return s;
                        }
                        // One or more messages, `\n`-separated.
                        let all = bytes::Bytes::from(std::mem::take(&mut self.plain));
                        let mut start = 0;
                        for (i, _) in all.iter().enumerate().filter(|(_, &b)| b == b'\n') {
                            self.decoded.push_back(all.slice(start..i));
                            start = i + 1;
                        }
                        self.decoded.push_back(all.slice(start..));
                        continue;
                    }
                    other => other,
                }
            };
            match msg {
                Ok(Some(Message::Text(t))) => {
                    let now = Instant::now();
                    if t.starts_with(b"{\"type\":\"delta\"") {
                        s.delta(now, last);
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&t).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("done") => {
                            s.tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(s.deltas);
                            s.end = Some(now);
                            return s;
                        }
                        Some("error") => {
                            s.error = Some(v.to_string());
                            return s;
                        }
                        _ => {}
                    }
                }
                Ok(Some(Message::Ping(p))) => {
                    let _ = self.send_ws(OpCode::Pong, &p).await;
                }
                Ok(Some(Message::Close(c))) => {
                    s.error = Some(format!("closed by server: {c:?}"));
                    return s;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if let Err(e) = self.read().await {
                        s.error = Some(e.to_string());
                        return s;
                    }
                }
                Err(e) => {
                    s.error = Some(e.to_string());
                    return s;
                }
            }
        }
    }

    /// One `GET` with `Connection: close`; reads the whole response.
    pub async fn get(&mut self, path: &str) -> std::io::Result<()> {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        self.write(req.into_bytes()).await?;
        let end = self.head_end().await?;
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other(head));
        }
        let len = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while self.buf.len() < end + len {
            self.read().await?;
        }
        Ok(())
    }

    /// One OpenAI streaming completion over SSE (chunked transfer coding).
    /// `path`: `/v1/completions` (deltas are `"text"` chunks) or `/v1/responses` (deltas are
    /// `response.output_text.delta` events).
    pub async fn sse_request(&mut self, path: &str, body: &str) -> Sample {
        let mut s = Sample::default();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let sent = Instant::now();
        s.sent = Some(sent);
        if let Err(e) = self.write(req.into_bytes()).await {
            s.error = Some(e.to_string());
            return s;
        }
        let end = match self.head_end().await {
            Ok(e) => e,
            Err(e) => {
                s.error = Some(e.to_string());
                return s;
            }
        };
        if !self.buf.starts_with(b"HTTP/1.1 200") {
            s.error = Some(String::from_utf8_lossy(&self.buf[..end]).into_owned());
            return s;
        }
        self.buf.advance(end);
        let mut last = sent;
        let mut body = BytesMut::new();
        loop {
            // Chunked framing: size line, data, CRLF; 0 ends the body.
            let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                if let Err(e) = self.read().await {
                    s.error = Some(e.to_string());
                    return s;
                }
                continue;
            };
            let size = std::str::from_utf8(&self.buf[..eol])
                .ok()
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok());
            let Some(size) = size else {
                s.error = Some("bad chunk size".into());
                return s;
            };
            if self.buf.len() < eol + 2 + size + 2 {
                if let Err(e) = self.read().await {
                    s.error = Some(e.to_string());
                    return s;
                }
                continue;
            }
            let now = Instant::now();
            if size == 0 {
                self.buf.advance(eol + 4);
                s.end = Some(now);
                return s;
            }
            body.extend_from_slice(&self.buf[eol + 2..eol + 2 + size]);
            self.buf.advance(eol + 2 + size + 2);
            while let Some(i) = body.windows(2).position(|w| w == b"\n\n") {
                let ev = body.split_to(i + 2);
                if ev.starts_with(b"event: response.") {
                    if ev.starts_with(b"event: response.output_text.delta") {
                        s.delta(now, &mut last);
                        s.tokens += 1;
                    }
                } else if ev.windows(8).any(|w| w == b"\"text\":\"")
                    && !ev.windows(10).any(|w| w == b"\"text\":\"\",")
                {
                    s.delta(now, &mut last);
                    s.tokens += 1;
                } else if let Some(pos) = ev.windows(8).position(|w| w == b"\"usage\":") {
                    let v: serde_json::Value = serde_json::from_slice(
                        ev.get(ev.iter().position(|&b| b == b'{').unwrap_or(0)..ev.len() - 2)
                            .unwrap_or(b""),
                    )
                    .unwrap_or_default();
                    let _ = pos;
                    if let Some(t) = v["usage"]["completion_tokens"].as_u64() {
                        s.tokens = t;
                    }
                }
            }
        }
    }
}
