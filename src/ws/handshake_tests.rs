//! Unit tests of `handshake.rs`: the RFC example, each rule and its status,
//! tenants and credentials, and the exact response bytes.

use super::*;
use crate::ws::tenant::hash_key;

const KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";

fn base_headers() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("Host", b"server.example.com"),
        ("Upgrade", b"websocket"),
        ("Connection", b"Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", b"13"),
    ]
}

fn models() -> Vec<String> {
    vec!["qwen2.5-0.5b".to_string(), "llama3.2-1b".to_string()]
}

fn tenants() -> Tenants {
    Tenants::new(vec![
        Tenant::new(
            "acme-corp".into(),
            vec![hash_key(b"acme-secret")],
            vec![],
            Default::default(),
        ),
        Tenant::new(
            "globex".into(),
            vec![hash_key(b"globex-secret")],
            vec!["llama3.2-1b".into()],
            Default::default(),
        ),
    ])
}

fn run(
    method: &str,
    minor: u8,
    query: Option<&str>,
    headers: &[(&str, &[u8])],
    tenants: &Tenants,
) -> Result<Accepted, HandshakeError> {
    let models = models();
    let req = HandshakeRequest {
        method,
        path: "/v1/chat",
        query,
        http_version_minor: minor,
        headers,
    };
    let ctx = HandshakeContext {
        models: &models,
        tenants,
        compression_allowed: true,
        deflate_window_bits: Some(12),
        min_window: 1024,
        default_window: 65536,
    };
    validate(&req, &ctx)
}

fn with(extra: &[(&'static str, &'static [u8])]) -> Vec<(&'static str, &'static [u8])> {
    let mut h = base_headers();
    for (name, value) in extra {
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if !value.is_empty() {
            h.push((name, value));
        }
    }
    h
}

fn err(
    query: Option<&str>,
    extra: &[(&'static str, &'static [u8])],
    tenants: &Tenants,
) -> (u16, &'static str) {
    let e = run("GET", 1, query, &with(extra), tenants).unwrap_err();
    (e.status(), e.label())
}

#[test]
fn rfc_accept_key_example() {
    assert_eq!(&accept_key(KEY), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    let ok = run("GET", 1, None, &base_headers(), &Tenants::default()).unwrap();
    assert_eq!(ok.accept_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(
        ok,
        Accepted {
            accept: *b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            subprotocol: None,
            model: "qwen2.5-0.5b".into(), // first served model by default
            stream_mode: StreamMode::Chunk,
            compression: Compression::None,
            deflate: None,
            compression_declined: None,
            window: None,
            tenant: None,
        }
    );
}

#[test]
fn request_line_and_upgrade_headers() {
    let none = Tenants::default();
    let e = run("POST", 1, None, &base_headers(), &none).unwrap_err();
    assert_eq!((e.status(), e.label()), (405, "bad_method"));
    let e = run("GET", 0, None, &base_headers(), &none).unwrap_err();
    assert_eq!((e.status(), e.label()), (400, "bad_http_version"));
    assert_eq!(
        err(None, &[("Upgrade", b"")], &none),
        (400, "missing_upgrade")
    );
    assert_eq!(
        err(None, &[("Upgrade", b"h2c")], &none),
        (400, "missing_upgrade")
    );
    assert_eq!(
        err(None, &[("Connection", b"keep-alive")], &none),
        (400, "missing_connection")
    );
    // Tokens are case-insensitive and may sit in lists.
    let h = with(&[
        ("upgrade", b"foo, WebSocket"),
        ("CONNECTION", b"keep-alive, Upgrade"),
    ]);
    assert!(run("GET", 1, None, &h, &none).is_ok());
    // Order: the method is checked first.
    let e = run("PUT", 0, None, &[], &none).unwrap_err();
    assert_eq!(e.label(), "bad_method");
}

#[test]
fn version_and_key() {
    let none = Tenants::default();
    for v in [&b"8"[..], b"", b"13, 8", b"12"] {
        assert_eq!(
            err(None, &[("Sec-WebSocket-Version", v)], &none),
            (426, "bad_version")
        );
    }
    assert!(run(
        "GET",
        1,
        None,
        &with(&[("Sec-WebSocket-Version", b" 13 ")]),
        &none
    )
    .is_ok());
    for k in [
        &b""[..],
        b"dGhlIHNhbXBsZSBub25jZQ",
        b"dGhlIHNhbXBsZSBub25jZQ==x",
        b"dGhlIHNhbXBsZSBub25jZ===",
        b"!!!!!!!!!!!!!!!!!!!!!!==",
    ] {
        assert_eq!(
            err(None, &[("Sec-WebSocket-Key", k)], &none),
            (400, "bad_key"),
            "{k:?}"
        );
    }
    let mut twice = base_headers();
    twice.push(("sec-websocket-key", KEY));
    assert_eq!(
        run("GET", 1, None, &twice, &none).unwrap_err().label(),
        "bad_key"
    );
}

#[test]
fn model_selection() {
    let none = Tenants::default();
    let ok = run("GET", 1, Some("model=llama3.2-1b"), &base_headers(), &none).unwrap();
    assert_eq!(ok.model, "llama3.2-1b");
    let ok = run(
        "GET",
        1,
        Some("model=llama3%2E2-1b"),
        &base_headers(),
        &none,
    )
    .unwrap();
    assert_eq!(ok.model, "llama3.2-1b", "query is percent-decoded");
    // Header wins over query.
    let ok = run(
        "GET",
        1,
        Some("model=nope"),
        &with(&[("X-Model-ID", b"llama3.2-1b")]),
        &none,
    )
    .unwrap();
    assert_eq!(ok.model, "llama3.2-1b");
    let long = "a".repeat(65);
    for bad in ["ab", long.as_str(), "a/b/c", "qwen 0.5", "caf%C3%A9"] {
        let q = format!("model={bad}");
        let e = run("GET", 1, Some(&q), &base_headers(), &none).unwrap_err();
        assert_eq!((e.status(), e.label()), (400, "bad_model_id"), "{bad}");
    }
    assert_eq!(
        err(None, &[("X-Model-ID", b"gpt-5")], &none),
        (404, "model_not_found")
    );
    let models: Vec<String> = vec![];
    let req = HandshakeRequest {
        method: "GET",
        path: "/v1/chat",
        query: None,
        http_version_minor: 1,
        headers: &base_headers(),
    };
    let ctx = HandshakeContext {
        models: &models,
        tenants: &none,
        compression_allowed: true,
        deflate_window_bits: Some(12),
        min_window: 1024,
        default_window: 65536,
    };
    assert_eq!(validate(&req, &ctx).unwrap_err().status(), 404);
}

#[test]
fn stream_mode_and_compression() {
    let none = Tenants::default();
    for (v, mode) in [
        ("full", StreamMode::Full),
        ("token", StreamMode::Token),
        ("chunk", StreamMode::Chunk),
    ] {
        let q = format!("stream_mode={v}");
        assert_eq!(
            run("GET", 1, Some(&q), &base_headers(), &none)
                .unwrap()
                .stream_mode,
            mode
        );
        assert_eq!(StreamMode::parse(mode.as_str().as_bytes()), Some(mode));
    }
    assert_eq!(
        err(None, &[("X-Stream-Mode", b"words")], &none),
        (400, "bad_stream_mode")
    );
    assert_eq!(
        err(Some("stream_mode=FULL"), &[], &none),
        (400, "bad_stream_mode")
    );
    let ok = run("GET", 1, Some("compression=zstd"), &base_headers(), &none).unwrap();
    assert_eq!(ok.compression, Compression::Zstd);
    let ok = run("GET", 1, None, &with(&[("X-Compression", b"none")]), &none).unwrap();
    assert_eq!(ok.compression, Compression::None);
    assert_eq!(
        err(None, &[("X-Compression", b"gzip")], &none),
        (400, "bad_compression")
    );
    // Not allowed by the server: accepted, but plain.
    let models = models();
    let h = with(&[("X-Compression", b"zstd")]);
    let req = HandshakeRequest {
        method: "GET",
        path: "/v1/chat",
        query: None,
        http_version_minor: 1,
        headers: &h,
    };
    let ctx = HandshakeContext {
        models: &models,
        tenants: &none,
        compression_allowed: false,
        deflate_window_bits: None,
        min_window: 1024,
        default_window: 65536,
    };
    assert_eq!(validate(&req, &ctx).unwrap().compression, Compression::None);
}

#[test]
fn auth_off_echoes_first_tenant_subprotocol() {
    let none = Tenants::default();
    let h = with(&[(
        "Sec-WebSocket-Protocol",
        b"bearer.xyz, chat, acme-corp.v2, other.v1",
    )]);
    let ok = run("GET", 1, None, &h, &none).unwrap();
    assert_eq!(
        (ok.subprotocol.as_deref(), ok.tenant.map(|t| t.id.clone())),
        (Some("acme-corp.v2"), None)
    );
}

#[test]
fn tenants_and_credentials() {
    let t = tenants();
    let proto = |v: &'static [u8]| ("Sec-WebSocket-Protocol", v);
    // Browser style: tenant + bearer subprotocols.
    let ok = run(
        "GET",
        1,
        None,
        &with(&[proto(b"acme-corp.v2, bearer.acme-secret")]),
        &t,
    )
    .unwrap();
    assert_eq!(
        (
            ok.subprotocol.as_deref(),
            ok.tenant.as_ref().map(|t| t.id.as_str())
        ),
        (Some("acme-corp.v2"), Some("acme-corp"))
    );
    // Header and query keys.
    let h = with(&[
        proto(b"acme-corp.v2"),
        ("Authorization", b"bearer  acme-secret"),
    ]);
    assert!(run("GET", 1, None, &h, &t).is_ok());
    assert!(run(
        "GET",
        1,
        Some("api_key=acme-secret"),
        &with(&[proto(b"acme-corp.v2")]),
        &t
    )
    .is_ok());
    // Key alone identifies the tenant; nothing to echo.
    let ok = run(
        "GET",
        1,
        None,
        &with(&[("Authorization", b"Bearer globex-secret")]),
        &t,
    )
    .unwrap();
    assert_eq!(
        (
            ok.subprotocol,
            ok.tenant.as_ref().map(|t| t.id.as_str()),
            ok.model.as_str()
        ),
        (None, Some("globex"), "llama3.2-1b")
    );

    assert_eq!(
        err(None, &[proto(b"initech.v1, bearer.acme-secret")], &t),
        (403, "unknown_tenant")
    );
    assert_eq!(err(None, &[], &t), (403, "unknown_tenant"));
    assert_eq!(
        err(None, &[proto(b"acme-corp.v2")], &t),
        (401, "bad_credentials")
    );
    assert_eq!(
        err(None, &[proto(b"acme-corp.v2, bearer.globex-secret")], &t),
        (401, "bad_credentials")
    );
    assert_eq!(
        err(None, &[("Authorization", b"Basic YWNtZQ==")], &t),
        (403, "unknown_tenant")
    );
    assert_eq!(
        err(Some("api_key=nobody"), &[], &t),
        (401, "bad_credentials")
    );
    let h = [
        proto(b"globex.v1, bearer.globex-secret"),
        ("X-Model-ID", b"qwen2.5-0.5b"),
    ];
    assert_eq!(err(None, &h, &t), (403, "model_not_allowed"));
    // Malformed tenant entries are not tenants (and never echoed).
    let h = [
        proto(b"acme-corp.2, acme-corp.v, .v1"),
        ("Authorization", b"Bearer acme-secret"),
    ];
    let ok = run("GET", 1, None, &with(&h), &t).unwrap();
    assert_eq!(
        (ok.subprotocol, ok.tenant.as_ref().map(|t| t.id.as_str())),
        (None, Some("acme-corp"))
    );
    // An empty Bearer header does not hide the bearer subprotocol.
    let h = [
        proto(b"acme-corp.v2, bearer.acme-secret"),
        ("Authorization", b"Bearer "),
    ];
    assert!(run("GET", 1, None, &with(&h), &t).is_ok());
}

#[test]
fn response_101() {
    let mut accepted = run("GET", 1, None, &base_headers(), &Tenants::default()).unwrap();
    let mut dst = BytesMut::new();
    write_response_101(&mut dst, &accepted);
    assert_eq!(
        &dst[..],
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    accepted.subprotocol = Some("acme-corp.v2".into());
    accepted.compression = Compression::Zstd;
    dst.clear();
    write_response_101(&mut dst, &accepted);
    let text = std::str::from_utf8(&dst).unwrap();
    assert!(text.contains("\r\nsec-websocket-protocol: acme-corp.v2\r\n"));
    assert!(text.ends_with("\r\nx-compression: zstd\r\n\r\n"));
    assert!(!text.to_ascii_lowercase().contains("content-length"));
}

#[test]
fn permessage_deflate_is_negotiated_answered_and_declined() {
    let none = Tenants::default();
    let offer = |v: &'static [u8]| with(&[("Sec-WebSocket-Extensions", v)]);
    let ok = run(
        "GET",
        1,
        None,
        &offer(b"permessage-deflate; client_max_window_bits"),
        &none,
    )
    .unwrap();
    assert_eq!(ok.compression, Compression::Deflate);
    let p = ok.deflate.unwrap();
    assert_eq!(p.server_window_bits, 12);
    let mut dst = BytesMut::new();
    write_response_101(&mut dst, &ok);
    let text = std::str::from_utf8(&dst).unwrap();
    assert!(
        text.ends_with(
            "\r\nsec-websocket-extensions: permessage-deflate; client_no_context_takeover\r\n\r\n"
        ),
        "{text}"
    );
    // zstd asked for by name wins over the offer (and is the only answer).
    let h = with(&[
        ("Sec-WebSocket-Extensions", b"permessage-deflate"),
        ("X-Compression", b"zstd"),
    ]);
    let ok = run("GET", 1, None, &h, &none).unwrap();
    assert_eq!((ok.compression, ok.deflate), (Compression::Zstd, None));
    // An offer we cannot meet: plain frames, and the reason for the session message.
    let ok = run(
        "GET",
        1,
        None,
        &offer(b"permessage-deflate; server_max_window_bits=8"),
        &none,
    )
    .unwrap();
    assert_eq!((ok.compression, ok.deflate), (Compression::None, None));
    assert!(ok
        .compression_declined
        .unwrap()
        .contains("server_max_window_bits=8"));
    // A malformed offer refuses the handshake, naming what is wrong.
    let e = run(
        "GET",
        1,
        None,
        &offer(b"permessage-deflate; server_max_window_bits=99"),
        &none,
    )
    .unwrap_err();
    assert_eq!((e.status(), e.label()), (400, "bad_extension"));
    assert!(
        e.message().contains("server_max_window_bits"),
        "{}",
        e.message()
    );
    // Budget spent or compression off: declined, said so.
    let models = models();
    let h = offer(b"permessage-deflate");
    let req = HandshakeRequest {
        method: "GET",
        path: "/v1/chat",
        query: None,
        http_version_minor: 1,
        headers: &h,
    };
    let ctx = HandshakeContext {
        models: &models,
        tenants: &none,
        compression_allowed: true,
        deflate_window_bits: None,
        min_window: 1024,
        default_window: 65536,
    };
    let ok = validate(&req, &ctx).unwrap();
    assert_eq!((ok.compression, ok.deflate), (Compression::None, None));
    assert!(ok.compression_declined.unwrap().contains("budget"));
}

#[test]
fn credit_window_opt_in() {
    let none = Tenants::default();
    let plain = run("GET", 1, None, &base_headers(), &none).unwrap();
    assert_eq!(plain.window, None);
    let ok = run(
        "GET",
        1,
        Some("flow_control=credit"),
        &base_headers(),
        &none,
    )
    .unwrap();
    assert_eq!(ok.window, Some(65536));
    let ok = run(
        "GET",
        1,
        Some("initial_window=4096"),
        &base_headers(),
        &none,
    )
    .unwrap();
    assert_eq!(ok.window, Some(4096));
    let h = with(&[("X-Initial-Window", b"2147483647")]);
    assert_eq!(run("GET", 1, None, &h, &none).unwrap().window, Some(MAX));
    for bad in [
        "1023",
        "2147483648",
        "-5",
        "",
        "1e6",
        "99999999999999999999999",
    ] {
        let q = format!("initial_window={bad}");
        assert_eq!(err(Some(&q), &[], &none), (400, "bad_window"), "{bad:?}");
    }
    assert_eq!(
        err(None, &[("X-Flow-Control", b"tcp")], &none),
        (400, "bad_window")
    );
}

const MAX: u32 = crate::config::MAX_WINDOW;
