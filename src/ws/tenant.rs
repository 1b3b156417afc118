//! Tenants as the handshake sees them: who may connect, with which keys, to
//! which models. Keys are stored only as SHA-256 digests and checked in
//! constant time.

use std::borrow::Cow;
use std::sync::Arc;

use ring::digest;

use crate::session::limits::{TenantLimits, TenantState};

use super::fields;
use super::handshake::{HandshakeContext, HandshakeError, HandshakeRequest};

/// One tenant from the config.
#[derive(Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Routing name, offered by clients as the subprotocol `<id>.<version>`.
    pub id: String,
    /// SHA-256 of each accepted API key (several, so keys can be rotated).
    pub key_sha256: Vec<[u8; 32]>,
    /// Models this tenant may use; empty means every served model.
    pub models: Vec<String>,
    /// Its limits and their counters, shared by every shard.
    pub state: Arc<TenantState>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but they have no place in logs either.
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .field("keys", &self.key_sha256.len())
            .field("models", &self.models)
            .field("limits", &self.state.limits)
            .finish()
    }
}

impl Tenant {
    pub fn new(
        id: String,
        key_sha256: Vec<[u8; 32]>,
        models: Vec<String>,
        limits: TenantLimits,
    ) -> Self {
        Self {
            id,
            key_sha256,
            models,
            state: Arc::new(TenantState::new(limits)),
        }
    }

    /// Whether `key` is one of this tenant's keys. Hashes the key and
    /// compares against every stored digest without early exit, so the time
    /// taken says nothing about which bytes matched.
    pub fn verify_key(&self, key: &[u8]) -> bool {
        let presented = hash_key(key);
        let mut found = false;
        for stored in &self.key_sha256 {
            found |= constant_time_eq(&presented, stored);
        }
        found
    }

    /// Whether this tenant may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// The tenant table. Empty (the default) means authentication is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenants(Vec<Arc<Tenant>>);

impl Tenants {
    pub fn new(tenants: Vec<Tenant>) -> Self {
        Tenants(tenants.into_iter().map(Arc::new).collect())
    }

    /// No tenants configured: anyone may connect without a key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tenant named `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.0.iter().find(|t| t.id == id)
    }

    /// The tenant holding `key`, for clients that send a key but no tenant
    /// subprotocol. Checks every tenant (constant time per key).
    pub fn find_by_key(&self, key: &[u8]) -> Option<&Arc<Tenant>> {
        let mut found = None;
        for t in &self.0 {
            if t.verify_key(key) && found.is_none() {
                found = Some(t);
            }
        }
        found
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.0.iter()
    }

    /// `new` (a reread tenants file) with the counters of this table carried over: a tenant
    /// that keeps its id and its limits keeps its state (streams and connections open, what it
    /// used of its rates); one whose limits changed starts afresh (what it holds open now is
    /// counted against the old limits until it ends).
    pub fn reloaded(&self, new: Tenants) -> Tenants {
        Tenants(
            new.0
                .into_iter()
                .map(|t| match self.get(&t.id) {
                    Some(old) if old.state.limits == t.state.limits => Arc::new(Tenant {
                        id: t.id.clone(),
                        key_sha256: t.key_sha256.clone(),
                        models: t.models.clone(),
                        state: old.state.clone(),
                    }),
                    _ => t,
                })
                .collect(),
        )
    }

    /// Reads the tenants file (`tenants_file`):
    ///
    /// ```yaml
    /// tenants:
    ///   - id: acme                 # routing name: subprotocol `acme.v1`
    ///     key_sha256: [<64 hex>]   # SHA-256 of each accepted API key
    ///     models: [null]           # optional; absent = every served model
    ///     requests_per_minute: 600 # each limit optional
    ///     tokens_per_minute: 200000
    ///     max_concurrent_streams: 32
    ///     max_connections: 64
    /// ```
    pub fn load(path: &std::path::Path) -> Result<Tenants, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            tenants: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            id: String,
            key_sha256: Vec<String>,
            #[serde(default)]
            models: Vec<String>,
            requests_per_minute: Option<u32>,
            tokens_per_minute: Option<u32>,
            max_concurrent_streams: Option<u32>,
            max_connections: Option<u32>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let file: File = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
        let mut out: Vec<Tenant> = Vec::new();
        for e in file.tenants {
            let valid_id = !e.id.is_empty()
                && e.id.len() <= 64
                && e.id.bytes().all(|b| fields::is_tchar(b) && b != b'.');
            if !valid_id {
                return Err(format!(
                    "tenant id {:?}: 1-64 token characters, no dot",
                    e.id
                ));
            }
            if out.iter().any(|t| t.id == e.id) {
                return Err(format!("tenant {:?} listed twice", e.id));
            }
            let keys = e
                .key_sha256
                .iter()
                .map(|h| parse_sha256_hex(h.trim()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    format!("tenant {:?}: key_sha256 entries are 64 hex digits", e.id)
                })?;
            if keys.is_empty() {
                return Err(format!("tenant {:?}: no key", e.id));
            }
            let limits = TenantLimits {
                requests_per_minute: e.requests_per_minute,
                tokens_per_minute: e.tokens_per_minute,
                max_concurrent_streams: e.max_concurrent_streams,
                max_connections: e.max_connections,
            };
            out.push(Tenant::new(e.id, keys, e.models, limits));
        }
        Ok(Tenants::new(out))
    }
}

impl From<Vec<Tenant>> for Tenants {
    fn from(tenants: Vec<Tenant>) -> Self {
        Tenants::new(tenants)
    }
}

/// The tenants in force: read per connection or request (never per token), replaced whole by a
/// reload (SIGHUP). A connection or request keeps the [`Tenant`] it was admitted under.
#[derive(Debug, Default)]
pub struct TenantTable(std::sync::RwLock<Arc<Tenants>>);

impl TenantTable {
    pub fn new(t: Tenants) -> Self {
        TenantTable(std::sync::RwLock::new(Arc::new(t)))
    }

    pub fn current(&self) -> Arc<Tenants> {
        match self.0.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Rereads `path`. Authentication stays on: a file that does not parse, or lists no
    /// tenant, leaves the current table in force (the error says why).
    pub fn reload(&self, path: &std::path::Path) -> Result<usize, String> {
        let new = Tenants::load(path)?;
        if new.is_empty() {
            return Err("it lists no tenant (authentication would turn off)".into());
        }
        let mut cur = match self.0.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = new.0.len();
        *cur = Arc::new(cur.reloaded(new));
        Ok(n)
    }
}

/// SHA-256 of an API key, as stored in [`Tenant::key_sha256`].
pub fn hash_key(key: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parses a 64-digit hex SHA-256 digest (how config files hold key hashes).
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Compares two digests touching every byte whatever the contents.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

/// Resolves the tenant and the subprotocol to echo.
///
/// Authentication off (no tenants): the first `<tenant>.<version>` offer is
/// echoed, no tenant is recorded and no key is needed. On: the first offered
/// tenant that exists is chosen (offers but none known: 403) and the key must
/// be one of its keys (401). A client that offers no tenant subprotocol is
/// identified by its key alone (no key: 403; a key nobody holds: 401).
pub(crate) fn authenticate<'a, 'c>(
    req: &HandshakeRequest<'a>,
    ctx: &HandshakeContext<'c>,
) -> Result<(Option<&'c Arc<Tenant>>, Option<&'a str>), HandshakeError> {
    let mut offers = fields::list(req.headers, "sec-websocket-protocol").filter_map(tenant_offer);
    if ctx.tenants.is_empty() {
        return Ok((None, offers.next().map(|(_, proto)| proto)));
    }
    let mut offered_any = false;
    let chosen = offers.find_map(|(id, proto)| {
        offered_any = true;
        ctx.tenants.get(id).map(|t| (t, proto))
    });
    let key = presented_key(req);
    match (chosen, offered_any, key) {
        (Some((tenant, proto)), _, Some(key)) if tenant.verify_key(&key) => {
            Ok((Some(tenant), Some(proto)))
        }
        (Some(_), _, _) => Err(HandshakeError::BadCredentials),
        (None, true, _) | (None, false, None) => Err(HandshakeError::UnknownTenant),
        (None, false, Some(key)) => match ctx.tenants.find_by_key(&key) {
            Some(tenant) => Ok((Some(tenant), None)),
            None => Err(HandshakeError::BadCredentials),
        },
    }
}

/// A `<tenant>.<version>` subprotocol entry (version `v` + digits), as
/// (tenant id, whole entry). Only token characters, so it is safe to echo.
fn tenant_offer(entry: &[u8]) -> Option<(&str, &str)> {
    if entry.starts_with(b"bearer.") || !entry.iter().all(|&b| fields::is_tchar(b)) {
        return None;
    }
    let entry = std::str::from_utf8(entry).ok()?;
    let (tenant, version) = entry.rsplit_once('.')?;
    let digits = version.strip_prefix('v')?;
    let valid =
        !tenant.is_empty() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    valid.then_some((tenant, entry))
}

/// The API key, from the first of: `Authorization: Bearer <key>`, a
/// `bearer.<key>` subprotocol, `?api_key=`.
fn presented_key<'a>(req: &HandshakeRequest<'a>) -> Option<Cow<'a, [u8]>> {
    request_key(req.headers, req.query)
}

/// The API key of a request (WebSocket upgrade or OpenAI route), from the first of:
/// `Authorization: Bearer <key>`, a `bearer.<key>` subprotocol, `?api_key=`.
pub fn request_key<'a>(
    headers: &'a fields::Headers<'a>,
    query: Option<&'a str>,
) -> Option<Cow<'a, [u8]>> {
    let from_header = fields::all(headers, "authorization").find_map(|v| {
        let (scheme, rest) = fields::trim(v).split_at_checked(7)?;
        let key = fields::trim(rest);
        (scheme.eq_ignore_ascii_case(b"bearer ") && !key.is_empty()).then_some(key)
    });
    let from_protocol = || {
        fields::list(headers, "sec-websocket-protocol")
            .find_map(|e| e.strip_prefix(b"bearer.").filter(|k| !k.is_empty()))
    };
    from_header
        .or_else(from_protocol)
        .map(Cow::Borrowed)
        .or_else(|| fields::query_param(query, "api_key").filter(|k| !k.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, keys: &[&str], models: &[&str]) -> Tenant {
        Tenant::new(
            id.to_string(),
            keys.iter().map(|k| hash_key(k.as_bytes())).collect(),
            models.iter().map(|m| m.to_string()).collect(),
            Default::default(),
        )
    }

    #[test]
    fn sha256_known_vector() {
        let expected =
            parse_sha256_hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Some(hash_key(b"abc")), expected);
        assert_eq!(parse_sha256_hex("zz"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn verify_and_lookup() {
        let tenants = Tenants::new(vec![
            tenant("acme-corp", &["old-key", "new-key"], &[]),
            tenant("globex", &["globex-key"], &["qwen2.5-0.5b"]),
        ]);
        let acme = tenants.get("acme-corp").unwrap();
        assert!(acme.verify_key(b"old-key") && acme.verify_key(b"new-key"));
        assert!(!acme.verify_key(b"new-key ") && !acme.verify_key(b""));
        assert!(acme.allows_model("anything"));
        let globex = tenants.get("globex").unwrap();
        assert!(globex.allows_model("qwen2.5-0.5b") && !globex.allows_model("llama"));
        assert_eq!(
            tenants.find_by_key(b"globex-key").map(|t| t.id.as_str()),
            Some("globex")
        );
        assert!(tenants.find_by_key(b"nope").is_none());
        assert!(tenants.get("initech").is_none());
        assert!(Tenants::default().is_empty());
        assert!(
            !format!("{acme:?}").contains("key_sha256"),
            "digests stay out of Debug"
        );
    }
}
