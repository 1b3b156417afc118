//! Helpers for end-to-end tests: an in-process server on 127.0.0.1:0 and a raw-bytes client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use clap::Parser;
use seedance::config::{Cli, Config};
use seedance::server::{self, Server};

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(extra: &[&str]) -> TestServer {
        let mut args = vec![
            "seedance-server",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--model",
            "null",
        ];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args).expect("flags");
        let config = Config::load(&cli).expect("config");
        let server = server::start(config).expect("server starts");
        let addr = server.addr;
        TestServer {
            server: Some(server),
            addr,
        }
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.join();
        }
    }
}

/// Reads an HTTP response head (and a content-length body); returns (status, head, body).
pub fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Opens a WebSocket session and consumes the `session` message.
pub fn open_ws(ts: &TestServer, path: &str) -> TcpStream {
    let mut s = ts.connect();
    s.write_all(upgrade_request(path, "").as_bytes())
        .expect("write");
    let (status, head, _) = read_response(&mut s);
    assert_eq!(status, 101, "{head}");
    let (op, payload) = read_frame(&mut s);
    assert_eq!(op, 1);
    assert!(String::from_utf8_lossy(&payload).contains("\"type\":\"session\""));
    s
}

/// A masked client frame.
pub fn frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first_byte];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= 65535 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

pub fn text(payload: &str) -> Vec<u8> {
    frame(0x81, payload.as_bytes())
}

/// Reads one server frame: (opcode, payload). Server frames are never masked.
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    if s.read_exact(&mut h).is_err() {
        return (0xff, Vec::new());
    }
    assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).expect("len16");
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).expect("len64");
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).expect("payload");
    (h[0] & 0x0f, p)
}

/// Reads frames until a close frame; returns its code (None for an empty close, 0 on EOF).
pub fn expect_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (op, p) = read_frame(s);
        match op {
            8 if p.len() >= 2 => return Some(u16::from_be_bytes([p[0], p[1]])),
            8 => return None,
            0xff => return Some(0),
            _ => continue,
        }
    }
}

/// Reads JSON text messages until one of `ty` arrives (skipping PINGs).
pub fn read_until(s: &mut TcpStream, ty: &str) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    loop {
        let (op, p) = read_frame(s);
        assert_ne!(op, 0xff, "connection ended before a {ty} message: {seen:?}");
        if op != 1 {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        let done = v["type"] == ty;
        seen.push(v);
        if done {
            return seen;
        }
    }
}
