//! The app API (issue 12): web apps sign in with the person's wallet and use the person's core,
//! on the person's own node or on a community node that hosts many cores.
//!
//! It is a second endpoint (`[app] listen`, `kubelt run --app-api`, default 127.0.0.1:5421)
//! served by the same machinery as the admin API — the [`super::registry`] tables (here
//! [`super::registry::APP`], the `kb_*` methods), the JSON-RPC parser and both transports — with
//! its own [`super::Gate`]: the admin cookie is never looked at here, and the tokens issued here
//! are never accepted on the admin port. No `Host` check (a community puts it behind its TLS
//! proxy under its own name) and CORS open to any origin by default, since tokens are bearer
//! tokens that a page must hold, not cookies a browser would attach for it.
//!
//! - [`login`]: `kb_getNonce`/`kb_verifyNonce`, a SIWE sign-in for the app's origin whose
//!   written namespaces are also a delegation of this node's key (see
//!   `kubelt_protocol::core::Login`); nonces single-use, fresh for 5 minutes, bounded in count;
//!   logins per minute per IP limited.
//! - [`token`]: JWTs (EdDSA over the node's ed25519 key) checked on *every* call: signature,
//!   expiry, audience (this node's peer id), revocation (`kb_logout`, persisted), core and
//!   capability.
//! - [`limits`]: who may log in (owners, or anyone on a hosted node) and the hosted quotas.

pub mod limits;
pub mod login;
pub mod token;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use libp2p::identity::Keypair;
use tokio_util::sync::CancellationToken;

use kubelt_protocol::core::Address;
use kubelt_protocol::node::Client;
use kubelt_protocol::store::Store;

use super::registry::{Caller, Capability};
use super::{http, ws, ApiState, AllowedHosts, Gate, RequestInfo, RpcError, MAX_REQUEST_BYTES};

pub use limits::{AppSettings, ConnectionGuard, Quotas};

/// The app API's own error codes: one for every way a login or a token is refused.
pub mod code {
    pub const WRONG_SIGNER: i64 = -32030;
    pub const NONCE_UNKNOWN: i64 = -32031;
    pub const NONCE_EXPIRED: i64 = -32032;
    pub const NONCE_USED: i64 = -32033;
    pub const TOKEN_MISSING: i64 = -32034;
    pub const TOKEN_EXPIRED: i64 = -32035;
    pub const TOKEN_REVOKED: i64 = -32036;
    pub const TOKEN_INVALID: i64 = -32037;
    pub const TOKEN_OTHER_NODE: i64 = -32038;
    pub const TOKEN_WRONG_CORE: i64 = -32039;
    pub const CAPABILITY_MISSING: i64 = -32040;
    pub const QUOTA_EXCEEDED: i64 = -32041;
    pub const OWNER_NOT_ALLOWED: i64 = -32042;
    pub const LOGIN_INVALID: i64 = -32043;
    pub const NO_ORIGIN: i64 = -32044;
    pub const REQUEST_OVER_QUOTA: i64 = -32045;
    pub const CORE_FULL: i64 = -32046;

    pub const ALL: &[(i64, &str)] = &[
        (WRONG_SIGNER, "the login message was not signed by the address it names"),
        (NONCE_UNKNOWN, "this node issued no such nonce (get one with kb_getNonce)"),
        (NONCE_EXPIRED, "the nonce is older than 5 minutes: get a new one"),
        (NONCE_USED, "the nonce was already used for a login: get a new one"),
        (TOKEN_MISSING, "this method needs a token: send 'Authorization: Bearer <token>' (WebSocket: ?access_token=)"),
        (TOKEN_EXPIRED, "the token has expired: sign in again"),
        (TOKEN_REVOKED, "the token was revoked with kb_logout: sign in again"),
        (TOKEN_INVALID, "not a token of this node: malformed, tampered with, or signed by another key"),
        (TOKEN_OTHER_NODE, "the token was issued for another node (its audience is another peer id)"),
        (TOKEN_WRONG_CORE, "the token is for another core than the one this request names"),
        (CAPABILITY_MISSING, "the token does not grant this on this namespace (e.g. a write with a read-only token)"),
        (QUOTA_EXCEEDED, "a quota of this node was reached (the message says which); nothing was changed"),
        (OWNER_NOT_ALLOWED, "this is a personal node and the wallet is not one of its owners"),
        (LOGIN_INVALID, "the signed login is not acceptable (the message says why)"),
        (NO_ORIGIN, "the request names no valid app origin (Origin or Host header) to sign in for"),
        (REQUEST_OVER_QUOTA, "the request is larger than this node's [app.quotas] max_request_bytes; nothing was done"),
        (CORE_FULL, "the core would hold more than this hosted node's [app.quotas] bytes_per_core (document plus objects); nothing was written"),
    ];
}

/// The app API's state, shared by its handlers.
pub struct App {
    pub settings: AppSettings,
    pub tokens: token::Tokens,
    pub logins: login::Logins,
    pub limits: limits::Limits,
}

impl App {
    /// The app API of the node with `keypair`; revoked tokens are kept in `revoked_path`.
    pub fn new(keypair: &Keypair, settings: AppSettings, revoked_path: PathBuf) -> anyhow::Result<App> {
        let tokens = token::Tokens::new(keypair, revoked_path)?;
        let limits = limits::Limits::new(settings.quotas.clone());
        Ok(App { settings, tokens, logins: login::Logins::default(), limits })
    }

    /// Who calls: never refused here, since the public methods need nothing; the token (if
    /// any) is checked by [`App::authorize`] on every call that needs one.
    pub fn caller(&self, request: &RequestInfo<'_>) -> Caller {
        Caller::App(AppCaller {
            token: super::bearer(request.headers, request.query_token).filter(|t| !t.is_empty()).map(Arc::from),
            domain: origin_domain(request.headers),
            core: request.core.map(Arc::from),
            ip: request.peer.map(|p| p.ip()),
        })
    }

    /// Checks the caller's token for a method that needs `capability` (on `namespace`, when
    /// the method has one): signature, expiry, audience, revocation, core, capability, and the
    /// per-core request quota.
    pub fn authorize(&self, caller: &AppCaller, capability: Capability, namespace: Option<&str>) -> Result<Grant, RpcError> {
        let token = caller.token.as_deref().ok_or_else(|| {
            RpcError::new(code::TOKEN_MISSING, "this method needs a token: sign in with kb_getNonce/kb_verifyNonce and send 'Authorization: Bearer <token>'")
        })?;
        let claims = self.tokens.verify(token)?;
        let core = Address::parse(&claims.sub).map_err(|_| RpcError::new(code::TOKEN_INVALID, "the token's subject is not an address"))?;
        if let Some(named) = caller.core.as_deref() {
            let named = Address::parse(named).map_err(|e| RpcError::invalid_params(format!("invalid core in the path '{named}': {e}")))?;
            if named != core {
                return Err(RpcError::new(
                    code::TOKEN_WRONG_CORE,
                    format!("the token is for core {} but the request is for core {}", core.to_checksum(), named.to_checksum()),
                ));
            }
        }
        if let Some(namespace) = namespace {
            let granted = claims.capability(namespace);
            if granted < Some(capability) {
                let wanted = match capability {
                    Capability::Read => "read",
                    Capability::Write => "write",
                };
                return Err(RpcError::new(code::CAPABILITY_MISSING, format!("the token does not let the app {wanted} namespace '{namespace}'")));
            }
        }
        self.limits.request(&core)?;
        Ok(Grant { core, claims })
    }

    /// Counts a WebSocket connection against its token's quota, for as long as the guard lives.
    pub fn open_connection(&self, caller: &Caller) -> Result<Option<ConnectionGuard>, RpcError> {
        let Caller::App(AppCaller { token: Some(token), .. }) = caller else { return Ok(None) };
        match self.tokens.verify(token) {
            Ok(claims) => self.limits.open_connection(&claims.jti).map(Some),
            // A bad token may still call the public methods; its calls are refused one by one.
            Err(_) => Ok(None),
        }
    }
}

/// The request-size quota of the app endpoint: a body over `[app.quotas] max_request_bytes`
/// is refused before it is parsed ([`code::REQUEST_OVER_QUOTA`]; bodies over the 2 MiB hard
/// limit never get this far).
pub fn check_request_size(gate: &Gate, bytes: usize) -> Result<(), RpcError> {
    let Gate::App(app) = gate else { return Ok(()) };
    let max = app.limits.quotas().max_request_bytes;
    if bytes > max {
        return Err(RpcError::new(
            code::REQUEST_OVER_QUOTA,
            format!("quota exceeded: the request has {bytes} bytes and this node takes at most {max} per request"),
        ));
    }
    Ok(())
}

/// How many bytes of stored changes `core` may have after a write, on a hosted node: the
/// `bytes_per_core` quota less the objects put here. `None` on a personal node (no quota) and
/// on the admin endpoint.
pub fn core_byte_limit(gate: &Gate, store: &Store, core: &Address) -> Result<Option<u64>, RpcError> {
    match gate {
        Gate::App(app) if app.settings.hosted => {
            let objects = app.limits.object_bytes(store, core)?;
            Ok(Some(app.limits.quotas().bytes_per_core.saturating_sub(objects)))
        }
        _ => Ok(None),
    }
}

/// The refusal of a write that would take `core` past its bytes quota.
pub fn core_full(core: &Address, used: u64, limit: u64) -> RpcError {
    RpcError::new(
        code::CORE_FULL,
        format!("quota exceeded: core {} would hold {used} bytes on this node, more than the {limit} it may hold; nothing was written", core.to_checksum()),
    )
}

/// What an app request presented, as [`App::caller`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCaller {
    /// The bearer token, unchecked.
    pub token: Option<Arc<str>>,
    /// The app's origin host (from `Origin`, else `Host`), if valid.
    pub domain: Option<String>,
    /// The core the path names (`/@0x…`).
    pub core: Option<Arc<str>>,
    /// The client's IP address.
    pub ip: Option<IpAddr>,
}

/// A checked token: the core it is for and what it grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub core: Address,
    pub claims: token::Claims,
}

/// The app's origin host: the host (and port) of `Origin`, else `Host`; `None` when neither
/// names a valid app origin.
fn origin_domain(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let from_origin = text(header::ORIGIN)
        .and_then(|origin| origin.split_once("://").map(|(_, rest)| rest))
        .map(|rest| rest.split('/').next().unwrap_or(rest).to_ascii_lowercase());
    let domain = match from_origin {
        Some(domain) => domain,
        None => text(header::HOST)?.to_ascii_lowercase(),
    };
    kubelt_protocol::core::delegation::is_valid_app_domain(&domain).then_some(domain)
}

/// The router of the app API: JSON-RPC on `/` and `/@<core>`, the example apps under
/// `/apps/` ([`crate::apps`]), CORS as configured.
pub fn router(state: ApiState) -> Router {
    let cors = match &state.gate {
        Gate::App(app) => cors(&app.settings.cors_origins),
        Gate::Admin { .. } => cors(&[]),
    };
    Router::new()
        .route("/", post(http::post).get(ws::upgrade))
        .route("/@{core}", post(http::post).get(ws::upgrade))
        .route("/apps/{*path}", get(crate::apps::serve))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(cors)
        .with_state(state)
}

/// CORS: any origin when `origins` is empty, else only those (`https://notes.example`).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([HttpMethod::GET, HttpMethod::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(3600))
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: the app API serves POST / (JSON-RPC), GET / (JSON-RPC over WebSocket) and its example apps at /apps/<name>/\n")
}

/// The state of the app endpoint.
pub fn state(client: Client, store: Store, app: Arc<App>, listen: SocketAddr, shutdown: CancellationToken) -> ApiState {
    let mut state = ApiState::new(client, store, Arc::from(""), AllowedHosts::new(listen, &[]), shutdown);
    state.registry = &super::registry::APP;
    state.gate = Gate::App(app);
    state
}

/// Serves the app API until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await
}

/// The capabilities of a login as the API shows them: `{namespace: ["read"] | ["read","write"]}`.
pub fn capabilities_json(reads: &[String], writes: &[String]) -> serde_json::Value {
    let mut map = BTreeMap::new();
    for ns in reads {
        map.insert(ns.clone(), serde_json::json!(["read"]));
    }
    for ns in writes {
        map.insert(ns.clone(), serde_json::json!(["read", "write"]));
    }
    serde_json::json!(map)
}

/// Binds the app API address with a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for the app API on {addr}: {e} (is another node using it? pick another with --app-api HOST:PORT)")
    })
}
