//! TLS 1.3 on the shards (SPEC 6), with rustls and the ring provider.
//!
//! rustls' buffered `ServerConnection` is driven by our own adapter over monoio's owned-buffer
//! I/O instead of `monoio-rustls` (no commits since 2024-05): the handshake runs on the whole
//! socket before it is split; afterwards the connection's reader task owns the read half and
//! feeds ciphertext in, the writer task owns the write half and drains records out, and both
//! share the one `ServerConnection` through an `Rc<RefCell<_>>` (never borrowed across an
//! await). Why the buffered API and not `UnbufferedServerConnection`: the buffered one keeps
//! the record layer, buffer limits and alert handling in rustls, and costs one copy of
//! plaintext into rustls on the way out — the same copy the plain path makes into its queue.
//!
//! What is served: TLS 1.3 only unless `tls12` is on; ALPN `http/1.1`; no 0-RTT; stateless
//! resumption tickets, either with per-process keys (rustls' ticketer, rotated every 6 h) or with
//! keys from `tls_ticket_keys` so every instance behind one load balancer resumes the others'
//! sessions ([`SharedTicketer`]). The certificate and the ticket keys reload on SIGHUP
//! ([`Tls::reload`]); connections already open keep theirs.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, RwLock};

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, Error as TlsLibError, PeerIncompatible, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::conn::Conn;
use super::io::{read_into, ConnRead, ConnWrite, TcpRead, TcpWrite};

/// Key exchange groups in our order of preference.
pub static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::ring::kx_group::X25519,
    rustls::crypto::ring::kx_group::SECP256R1,
    rustls::crypto::ring::kx_group::SECP384R1,
];

/// Ciphertext read per call (a TLS record is at most 16 KiB + overhead).
const READ_CHUNK: usize = 4096;
/// The ciphertext write buffer a writer keeps between writes.
const KEEP_WRITE_BUF: usize = 64 * 1024;
/// Lifetime of tickets made with shared keys (the operator rotates the key file more often).
const SHARED_TICKET_LIFETIME_S: u32 = 6 * 3600;

/// TLS settings from the configuration.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Allow TLS 1.2 as well.
    pub tls12: bool,
    /// File of ticket keys shared by instances (`None`: per-process keys).
    pub ticket_keys: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {msg}")]
    Cert { path: PathBuf, msg: String },
    #[error("TLS key {path}: {msg}")]
    Key { path: PathBuf, msg: String },
    #[error("TLS ticket keys {path}: {msg}")]
    Tickets { path: PathBuf, msg: String },
    #[error("TLS: {0}")]
    Config(#[from] TlsLibError),
}

/// The process's TLS state: the rustls configuration the shards accept with, and what SIGHUP
/// reloads.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    certs: Arc<Reloadable>,
    tickets: Option<Arc<SharedTicketer>>,
    settings: TlsSettings,
}

impl Tls {
    pub fn load(settings: &TlsSettings) -> Result<Tls, TlsError> {
        let certs = Arc::new(Reloadable {
            current: RwLock::new(load_certified_key(&settings.cert, &settings.key)?),
        });
        // ring has no post-quantum key exchange (hence rustls' deprecation note); aws-lc-rs has,
        // but needs a C toolchain and cmake at build time. X25519 and P-256/384 are offered.
        // Key exchange X25519 first: ring's P-384 is generic bignum code, and this rustls lists
        // it first — measured, that made a full handshake cost 3.2 ms of server CPU (and a
        // HelloRetryRequest for clients that sent an X25519 share) instead of ~0.3 ms.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            kx_groups: KX_GROUPS.to_vec(),
            ..rustls::crypto::ring::default_provider()
        });
        let versions: &[&rustls::SupportedProtocolVersion] = if settings.tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 1;
        let tickets = match &settings.ticket_keys {
            Some(path) => {
                let t = Arc::new(SharedTicketer::load(path)?);
                config.ticketer = t.clone();
                Some(t)
            }
            None => {
                config.ticketer = rustls::crypto::ring::Ticketer::new()?;
                None
            }
        };
        Ok(Tls {
            config: Arc::new(config),
            certs,
            tickets,
            settings: settings.clone(),
        })
    }

    /// Re-reads the certificate chain, its key and the ticket keys. On error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.settings.cert, &self.settings.key)?;
        let keys = match (&self.tickets, &self.settings.ticket_keys) {
            (Some(_), Some(path)) => Some(read_ticket_keys(path)?),
            _ => None,
        };
        if let Ok(mut cur) = self.certs.current.write() {
            *cur = key;
        }
        if let (Some(t), Some(keys)) = (&self.tickets, keys) {
            if let Ok(mut cur) = t.keys.write() {
                *cur = keys;
            }
        }
        Ok(())
    }
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |msg: String| TlsError::Cert {
        path: cert.to_path_buf(),
        msg,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        msg: e.to_string(),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            msg: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        msg: format!("does not match the certificate: {e}"),
    })?;
    Ok(Arc::new(ck))
}

/// The certificate every handshake gets; swapped whole on reload.
#[derive(Debug)]
struct Reloadable {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

/// One ticket key: an id (the first 4 bytes of its SHA-256) and the AEAD key.
struct TicketKey {
    id: [u8; 4],
    key: aead::LessSafeKey,
}

/// Session tickets sealed with keys from a file that every instance reads: the first key seals,
/// every key opens, so an operator rotates by prepending a new key and later dropping the last
/// (then SIGHUP). Tickets are `id(4) ‖ nonce(12) ‖ AES-256-GCM(state) ‖ tag(16)`.
pub struct SharedTicketer {
    keys: RwLock<Vec<TicketKey>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.keys.read().map_or(0, |k| k.len());
        f.debug_struct("SharedTicketer").field("keys", &n).finish()
    }
}

/// Reads a ticket key file: one key per line, 64 hex digits (32 bytes); `#` comments and blank
/// lines ignored.
fn read_ticket_keys(path: &Path) -> Result<Vec<TicketKey>, TlsError> {
    let err = |msg: String| TlsError::Tickets {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = decode_hex(line)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| err(format!("line {}: expected 64 hex digits", n + 1)))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest.as_ref()[..4]);
        let unbound =
            aead::UnboundKey::new(&aead::AES_256_GCM, &bytes).map_err(|_| err("bad key".into()))?;
        keys.push(TicketKey {
            id,
            key: aead::LessSafeKey::new(unbound),
        });
    }
    if keys.is_empty() {
        return Err(err("no key in the file".into()));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

impl SharedTicketer {
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            keys: RwLock::new(read_ticket_keys(path)?),
            rng: SystemRandom::new(),
        })
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        SHARED_TICKET_LIFETIME_S
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().ok()?;
        let k = keys.first()?;
        let mut nonce = [0u8; 12];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + 12 + plain.len() + 16);
        out.extend_from_slice(&k.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        k.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(k.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = cipher.split_first_chunk::<4>()?;
        let (nonce, sealed) = rest.split_first_chunk::<12>()?;
        let keys = self.keys.read().ok()?;
        let k = keys.iter().find(|k| &k.id == id)?;
        let mut body = sealed.to_vec();
        let plain = k
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(*nonce),
                aead::Aad::from(*id),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Why a TLS handshake failed (the `seedance_handshake_failures_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Plain HTTP on the TLS port.
    PlainHttp,
    NoSharedVersion,
    NoSharedCipher,
    /// The client refused our certificate.
    BadCertificate,
    Timeout,
    /// Anything else: malformed records, the peer closing mid-handshake.
    Protocol,
}

impl Failure {
    pub const fn label(self) -> &'static str {
        match self {
            Failure::PlainHttp => "tls_plain_http",
            Failure::NoSharedVersion => "tls_no_shared_version",
            Failure::NoSharedCipher => "tls_no_shared_cipher",
            Failure::BadCertificate => "tls_bad_certificate",
            Failure::Timeout => "tls_timeout",
            Failure::Protocol => "tls_protocol",
        }
    }

    fn of(e: &TlsLibError) -> Failure {
        use PeerIncompatible as P;
        match e {
            TlsLibError::PeerIncompatible(
                P::SupportedVersionsExtensionRequired
                | P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::ServerDoesNotSupportTls12Or13,
            ) => Failure::NoSharedVersion,
            TlsLibError::PeerIncompatible(_) => Failure::NoSharedCipher,
            TlsLibError::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied,
            ) => Failure::BadCertificate,
            TlsLibError::AlertReceived(AlertDescription::ProtocolVersion) => {
                Failure::NoSharedVersion
            }
            TlsLibError::AlertReceived(AlertDescription::HandshakeFailure) => {
                Failure::NoSharedCipher
            }
            _ => Failure::Protocol,
        }
    }
}

/// Whether the first bytes on a TLS port are an HTTP request rather than a TLS record.
fn looks_like_http(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
    ];
    b.len() >= 4 && METHODS.iter().any(|m| b[..4].eq_ignore_ascii_case(m))
}

/// What a plain HTTP request on the TLS port gets before the socket closes.
fn plain_http_answer() -> Vec<u8> {
    let body = r#"{"error":{"code":"tls_required","message":"this port speaks TLS: use https:// or wss://"}}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Runs the server side of a handshake on the whole socket. Returns the connection and the
/// ciphertext already read past the handshake (the client's first records).
pub async fn accept(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
) -> Result<(ServerConnection, BytesMut), Failure> {
    let mut tls = ServerConnection::new(config).map_err(|_| Failure::Protocol)?;
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = Vec::new();
    let mut first = true;
    loop {
        flush(&mut tls, stream, &mut wbuf).await?;
        if !tls.is_handshaking() {
            return Ok((tls, rbuf));
        }
        match read_into(stream, &mut rbuf, READ_CHUNK).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Failure::Protocol),
        }
        if first && rbuf.len() >= 4 {
            first = false;
            if looks_like_http(&rbuf) {
                let (_, _) = stream.write_all(plain_http_answer()).await;
                return Err(Failure::PlainHttp);
            }
        }
        if let Err(e) = feed(&mut tls, &mut rbuf) {
            // Send the alert rustls queued, then give up.
            let _ = flush(&mut tls, stream, &mut wbuf).await;
            return Err(e.as_ref().map_or(Failure::Protocol, Failure::of));
        }
    }
}

/// Feeds buffered ciphertext to rustls and processes it. `Err(Some(e))`: a TLS error (an alert is
/// queued); `Err(None)`: rustls could not take the bytes.
fn feed(tls: &mut ServerConnection, rbuf: &mut BytesMut) -> Result<(), Option<TlsLibError>> {
    while !rbuf.is_empty() {
        let mut slice: &[u8] = rbuf;
        let n = tls.read_tls(&mut slice).map_err(|_| None)?;
        rbuf.advance(n);
        tls.process_new_packets().map_err(Some)?;
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Writes every record rustls has queued to `stream`.
async fn flush(
    tls: &mut ServerConnection,
    stream: &mut TcpStream,
    wbuf: &mut Vec<u8>,
) -> Result<(), Failure> {
    while tls.wants_write() {
        wbuf.clear();
        while tls.wants_write() {
            if tls.write_tls(wbuf).is_err() {
                return Err(Failure::Protocol);
            }
        }
        let (res, back) = stream.write_all(std::mem::take(wbuf)).await;
        *wbuf = back;
        res.map_err(|_| Failure::Protocol)?;
    }
    Ok(())
}

/// The reader half of a TLS connection: ciphertext from the socket in, plaintext out.
pub struct TlsReader {
    tcp: TcpRead,
    tls: Rc<RefCell<ServerConnection>>,
    cbuf: BytesMut,
    conn: Rc<Conn>,
    eof: bool,
}

/// The writer half: plaintext in, records to the socket.
pub struct TlsWriter {
    tcp: TcpWrite,
    tls: Rc<RefCell<ServerConnection>>,
    wbuf: Vec<u8>,
}

/// Splits an established TLS connection into its reader and writer halves.
pub fn split(
    stream: TcpStream,
    tls: ServerConnection,
    leftover: BytesMut,
    conn: Rc<Conn>,
) -> (TlsReader, TlsWriter) {
    use monoio::io::Splitable;
    let (rd, wr) = stream.into_split();
    let tls = Rc::new(RefCell::new(tls));
    (
        TlsReader {
            tcp: rd,
            tls: tls.clone(),
            cbuf: leftover,
            conn,
            eof: false,
        },
        TlsWriter {
            tcp: wr,
            tls,
            wbuf: Vec::new(),
        },
    )
}

/// What the reader found decrypted.
enum Plain {
    Data(usize),
    /// The peer closed (`close_notify`, or the socket ended).
    Closed,
    Empty,
}

impl TlsReader {
    /// Moves decrypted plaintext into `buf`.
    fn take_plain(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<Plain> {
        let mut tls = self.tls.borrow_mut();
        let len = buf.len();
        buf.resize(len + want.max(1), 0);
        let r = tls.reader().read(&mut buf[len..]);
        let got = match r {
            Ok(0) => Ok(Plain::Closed),
            Ok(n) => Ok(Plain::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Plain::Empty),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Plain::Closed),
            Err(e) => Err(e),
        };
        let n = match got {
            Ok(Plain::Data(n)) => n,
            _ => 0,
        };
        buf.truncate(len + n);
        got
    }

    /// Processes buffered ciphertext; wakes the writer when rustls has records to send.
    fn process(&mut self) -> io::Result<()> {
        let mut tls = self.tls.borrow_mut();
        let r = feed(&mut tls, &mut self.cbuf);
        if tls.wants_write() {
            self.conn.wake_writer.notify();
        }
        if self.cbuf.is_empty() && self.cbuf.capacity() > 2 * READ_CHUNK {
            self.cbuf = BytesMut::new();
        }
        r.map_err(|e| io::Error::other(e.map_or("TLS read".to_string(), |e| e.to_string())))
    }
}

impl ConnRead for TlsReader {
    async fn read_more(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        loop {
            match self.take_plain(buf, want)? {
                Plain::Data(n) => return Ok(n),
                Plain::Closed => return Ok(0),
                Plain::Empty if self.eof => return Ok(0),
                Plain::Empty => {}
            }
            if !self.cbuf.is_empty() {
                let before = self.cbuf.len();
                self.process()?;
                if self.cbuf.len() < before {
                    continue;
                }
            }
            if self.tcp.read_more(&mut self.cbuf, READ_CHUNK).await? == 0 {
                self.eof = true;
            }
            self.process()?;
        }
    }

    async fn read_more_until<F: Future<Output = ()>>(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        mut stop: Pin<&mut F>,
    ) -> io::Result<Option<usize>> {
        loop {
            match self.take_plain(buf, want)? {
                Plain::Data(n) => return Ok(Some(n)),
                Plain::Closed => return Ok(Some(0)),
                Plain::Empty if self.eof => return Ok(Some(0)),
                Plain::Empty => {}
            }
            match self
                .tcp
                .read_more_until(&mut self.cbuf, READ_CHUNK, stop.as_mut())
                .await?
            {
                None => return Ok(None),
                Some(0) => self.eof = true,
                Some(_) => {}
            }
            self.process()?;
        }
    }
}

impl TlsWriter {
    /// Writes every record rustls has queued.
    async fn flush_tls(&mut self) -> io::Result<()> {
        loop {
            let mut wbuf = std::mem::take(&mut self.wbuf);
            wbuf.clear();
            {
                let mut tls = self.tls.borrow_mut();
                while tls.wants_write() {
                    tls.write_tls(&mut wbuf)?;
                }
            }
            if wbuf.is_empty() {
                self.wbuf = wbuf;
                return Ok(());
            }
            let (res, back) = self.tcp.write_all(wbuf).await;
            self.wbuf = if back.capacity() > KEEP_WRITE_BUF {
                Vec::new()
            } else {
                back
            };
            res?;
        }
    }
}

impl ConnWrite for TlsWriter {
    async fn write_segs(&mut self, segs: &mut Vec<Bytes>) -> io::Result<usize> {
        let mut total = 0;
        for seg in segs.drain(..) {
            let mut rest: &[u8] = &seg;
            while !rest.is_empty() {
                let n = self.tls.borrow_mut().writer().write(rest)?;
                rest = &rest[n..];
                total += n;
                if n == 0 || !rest.is_empty() {
                    // rustls' buffer is full: send what it holds, then go on.
                    self.flush_tls().await?;
                }
            }
        }
        self.flush_tls().await?;
        Ok(total)
    }

    async fn flush_pending(&mut self) -> io::Result<()> {
        self.flush_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.tls.borrow_mut().send_close_notify();
        let r = self.flush_tls().await;
        let s = ConnWrite::shutdown(&mut self.tcp).await;
        r.and(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_on_the_tls_port_is_recognised() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"post /v1/completions"));
        assert!(!looks_like_http(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!looks_like_http(b"GE"));
        let answer = plain_http_answer();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.ends_with(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "tls_required");
    }

    #[test]
    fn shared_tickets_open_with_any_key_of_the_file_and_only_those() {
        let dir = std::env::temp_dir().join(format!("seedance-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let path = dir.join("keys");
        std::fs::write(&path, format!("# current first\n{a}\n")).unwrap();
        let old = SharedTicketer::load(&path).unwrap();
        let t1 = old.encrypt(b"session state").unwrap();
        assert_eq!(old.decrypt(&t1).unwrap(), b"session state");
        // Rotation: a new key first, the old one still opens.
        std::fs::write(&path, format!("{b}\n{a}\n")).unwrap();
        let new = SharedTicketer::load(&path).unwrap();
        assert_eq!(new.decrypt(&t1).unwrap(), b"session state");
        let t2 = new.encrypt(b"newer").unwrap();
        assert_ne!(t2[..4], t1[..4], "sealed with the new key");
        assert!(
            old.decrypt(&t2).is_none(),
            "an instance without the new key cannot open it"
        );
        // Tampering, truncation, garbage.
        let mut bad = t2.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(new.decrypt(&bad).is_none());
        assert!(new.decrypt(&t2[..10]).is_none());
        assert!(new.decrypt(b"").is_none());
        // Malformed files are refused with the line.
        std::fs::write(&path, "abc\n").unwrap();
        let e = SharedTicketer::load(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(SharedTicketer::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failures_are_classified() {
        use PeerIncompatible as P;
        let f = |e: TlsLibError| Failure::of(&e).label();
        assert_eq!(
            f(TlsLibError::PeerIncompatible(
                P::SupportedVersionsExtensionRequired
            )),
            "tls_no_shared_version"
        );
        assert_eq!(
            f(TlsLibError::PeerIncompatible(P::NoCipherSuitesInCommon)),
            "tls_no_shared_cipher"
        );
        assert_eq!(
            f(TlsLibError::AlertReceived(AlertDescription::UnknownCA)),
            "tls_bad_certificate"
        );
        assert_eq!(f(TlsLibError::DecryptError), "tls_protocol");
    }
}
