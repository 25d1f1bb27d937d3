//! The local admin API: JSON-RPC 2.0 over HTTP (`POST /`) and over WebSocket (upgrade on
//! `GET /`) on 127.0.0.1, described by an OpenRPC document at `rpc.discover`, and Prometheus
//! metrics at `GET /metrics`.
//!
//! Every JSON-RPC call must carry the secret the node wrote to `<repo>/api.cookie`, as
//! `Authorization: Bearer <secret>` (a WebSocket may give it instead as the `access_token`
//! query parameter, since browsers cannot set headers there), so that other local users cannot
//! drive the node. Every request must name the node in its `Host` header ([`host`]), so that
//! web pages cannot reach the API through DNS rebinding. The gateway is not here: it serves
//! content anyone can publish, so it runs on its own listener, another origin
//! (`crate::gateway`).
//!
//! The pieces: [`registry`] holds every method as one row of its namespace's table (name,
//! docs, auth kind, handler) and builds `rpc.discover` from them; [`jsonrpc`] parses request
//! bodies and runs them through a registry; [`http`] and [`ws`] are the two transports;
//! `node.rs`, `content.rs` and `core.rs` are the tables and their handlers; `private.rs`
//! adds and reads private objects (and serves `GET /private/<core>/<cid>`, decrypted, with the
//! secret).
//!
//! Errors follow JSON-RPC 2.0 and every code is listed in [`code::ALL`] (and in
//! `rpc.discover`'s `components.errors`).
//!
//! # Why not jsonrpsee
//!
//! jsonrpsee (the server of Substrate and several Ethereum clients) was the first choice: it
//! runs as a tower service under axum, and brings WebSocket, subscriptions and batches. Tried
//! (0.26.1) against what this API promises, it does not fit in three places, each measured or
//! read in its source:
//! - **Unbounded work per WebSocket.** Its connection loop reads the next message and spawns a
//!   task for it whether or not earlier replies could be sent (bounded backpressure was removed
//!   upstream, paritytech/jsonrpsee#1209). A client that sends requests and never reads made a
//!   server with a 16-message buffer grow by 888 MiB over 100,000 requests of 4 KiB, with no
//!   limit in sight and no hook to stop it. The app API (issue 12) faces clients on a hosted
//!   node, where that is a denial of service.
//! - **Request ids.** Its ids are `u64` or strings; a request whose `id` is `-1`, `1.5` or an
//!   object is taken for a notification: the method runs and the client gets no reply at all
//!   (measured). JSON-RPC 2.0 allows any number, and this API answers an invalid id with
//!   -32600.
//! - **Error codes.** Its own errors use -32010 and -32011 for batch limits, the codes this API
//!   already gives "core not held" and "not writable"; and a slow subscriber cannot be closed
//!   with a reason of our choosing.
//!
//! Each could be worked around in part (an HTTP layer, remapping codes), but not the first, so
//! this stays on axum: its WebSocket (tokio-tungstenite) carries frames, and the rest is
//! [`jsonrpc`] (already written and property-tested) plus [`ws`], under 400 lines with every
//! buffer bounded and a close reason for every way a connection is dropped.

pub mod app;
mod content;
mod core;
mod host;
mod http;
pub mod jsonrpc;
mod kb;
mod kb_msg;
mod node;
mod objects;
mod private;
pub mod registry;
pub mod ws;
mod msg;

pub use host::AllowedHosts;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use kubelt_protocol::node::Client;
use kubelt_protocol::store::Store;

/// Largest request the API reads: an HTTP body or a WebSocket message. The biggest calls
/// (`core_set` with a large value) fit; anything larger is refused with
/// [`code::REQUEST_TOO_LARGE`] before it is parsed.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// JSON-RPC error codes used by the API.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    pub const NODE_ERROR: i64 = -32000;
    pub const UNAUTHORIZED: i64 = -32001;
    pub const FORBIDDEN_HOST: i64 = -32002;
    /// The request is larger than [`super::MAX_REQUEST_BYTES`].
    pub const REQUEST_TOO_LARGE: i64 = -32003;
    /// A subscription method was called over HTTP.
    pub const NEEDS_WEBSOCKET: i64 = -32004;
    /// A limit of the connection or the node (subscriptions, WebSocket connections).
    pub const LIMIT_REACHED: i64 = -32005;
    /// A subscription ended on its own (it fell behind the node, or the node stopped).
    pub const SUBSCRIPTION_ENDED: i64 = -32006;
    /// This node does not hold the core.
    pub const CORE_NOT_HELD: i64 = -32010;
    /// This node has no delegation to write the core.
    pub const CORE_NOT_WRITABLE: i64 = -32011;
    /// This node's key was revoked by the core's owner.
    pub const CORE_REVOKED: i64 = -32012;
    /// Not a valid owner statement (delegation or revocation).
    pub const INVALID_STATEMENT: i64 = -32013;
    /// The delegation is for another node's key.
    pub const OTHER_NODE: i64 = -32014;
    /// The write breaks the core's rules (namespace not delegated, nothing to change, ...).
    pub const CORE_REFUSED: i64 = -32015;
    /// The value is private and this node holds no key for it.
    pub const CORE_ENCRYPTED: i64 = -32016;
    /// The private value's ciphertext does not open under its key (tampered): refused.
    pub const CORE_UNDECRYPTABLE: i64 = -32017;
    /// No device key of the recipient core is known (yet).
    pub const MSG_NO_DEVICE_KEYS: i64 = -32020;
    /// No such message on this node.
    pub const MSG_NOT_FOUND: i64 = -32021;
    /// The message's text is larger than a message holds (64 KiB).
    pub const MSG_TOO_LARGE: i64 = -32022;
    /// A replica of the recipient refused the message for good.
    pub const MSG_REFUSED: i64 = -32023;

    /// Every code with its meaning, for `rpc.discover`.
    pub const ALL: &[(i64, &str)] = &[
        (PARSE_ERROR, "the body is not JSON"),
        (INVALID_REQUEST, "not a JSON-RPC 2.0 request"),
        (METHOD_NOT_FOUND, "no such method"),
        (INVALID_PARAMS, "missing or invalid params (including a bad namespace, path or value)"),
        (INTERNAL_ERROR, "a bug in the node"),
        (NODE_ERROR, "the node could not do it (storage, network, stopped)"),
        (UNAUTHORIZED, "missing or wrong API secret, or a method these credentials may not call"),
        (FORBIDDEN_HOST, "the Host header is not one of the node's names"),
        (REQUEST_TOO_LARGE, "the request is larger than 2 MiB (HTTP 413; on a WebSocket, close code 1009)"),
        (NEEDS_WEBSOCKET, "subscriptions need a WebSocket connection (GET / with Upgrade: websocket)"),
        (LIMIT_REACHED, "a limit of this connection or node was reached (the message says which)"),
        (SUBSCRIPTION_ENDED, "the subscription ended on its own: it fell behind the node's updates, or the node stopped; re-read and subscribe again"),
        (CORE_NOT_HELD, "this node does not hold the core (follow it, or submit a delegation)"),
        (CORE_NOT_WRITABLE, "this node has no delegation to write the core"),
        (CORE_REVOKED, "this node's key was revoked by the core's owner"),
        (INVALID_STATEMENT, "not a valid delegation or revocation (the message says why)"),
        (OTHER_NODE, "the delegation authorizes another node's key"),
        (CORE_REFUSED, "the write breaks the core's rules (the message says which)"),
        (CORE_ENCRYPTED, "encrypted: the value is private and this node holds no key for it (core_unlock, or wait for a device of the owner to share its key)"),
        (CORE_UNDECRYPTABLE, "the private value's ciphertext does not open under its key (tampered or malformed): refused as a value"),
        (MSG_NO_DEVICE_KEYS, "no device key of the recipient core is known yet (the node follows the core to learn them; retry)"),
        (MSG_NOT_FOUND, "no message with this id on this node"),
        (MSG_TOO_LARGE, "the message's text is larger than 64 KiB"),
        (MSG_REFUSED, "a replica of the recipient refused the message for good (the message says why); it is not kept for retries"),
    ];
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }
    pub fn node(error: impl std::fmt::Display) -> Self {
        Self::new(code::NODE_ERROR, error.to_string())
    }
    /// A failed core command, with the code of its kind (see [`code`]).
    pub fn core(error: kubelt_protocol::node::CoreCommandError) -> Self {
        use kubelt_protocol::node::CoreCommandError as E;
        let code = match &error {
            E::NotHeld(_) => code::CORE_NOT_HELD,
            E::NotWritable(_) => code::CORE_NOT_WRITABLE,
            E::Revoked(_) => code::CORE_REVOKED,
            E::InvalidStatement { .. } => code::INVALID_STATEMENT,
            E::OtherNode { .. } => code::OTHER_NODE,
            E::InvalidInput(_) => code::INVALID_PARAMS,
            E::Refused(_) => code::CORE_REFUSED,
            E::Encrypted(_) => code::CORE_ENCRYPTED,
            E::Undecryptable(_) => code::CORE_UNDECRYPTABLE,
            E::Full { .. } => app::code::CORE_FULL,
            _ => code::NODE_ERROR,
        };
        Self::new(code, error.to_string())
    }
    fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub client: Client,
    pub store: Store,
    /// The methods this endpoint serves.
    pub registry: &'static registry::Registry,
    /// How this endpoint tells who calls: the admin cookie, or app tokens.
    pub gate: Gate,
    /// Keeps GC out while an add has not pinned its root yet.
    pub gc_lock: crate::content::GcLock,
    /// The `Host` names the API answers to.
    pub allowed_hosts: Arc<AllowedHosts>,
    /// Cancelled when the node stops: WebSocket connections then close (code 1001).
    pub shutdown: CancellationToken,
    /// The open WebSocket connections: their limit and counters.
    pub websockets: Arc<ws::Websockets>,
}

impl ApiState {
    pub fn new(client: Client, store: Store, secret: Arc<str>, allowed_hosts: AllowedHosts, shutdown: CancellationToken) -> Self {
        ApiState {
            client,
            store,
            registry: &registry::ADMIN,
            gate: Gate::Admin { secret },
            gc_lock: Default::default(),
            allowed_hosts: Arc::new(allowed_hosts),
            shutdown,
            websockets: Default::default(),
        }
    }
}

/// How an endpoint establishes who calls, from a request's credentials. Each endpoint has
/// one, so the admin cookie is never looked at on the app port and app tokens never on the
/// admin port.
#[derive(Clone)]
pub enum Gate {
    /// The admin API: every request must carry the secret from `api.cookie`.
    Admin { secret: Arc<str> },
    /// The app API: anyone may call the public methods; app methods check the bearer token
    /// on every call ([`app::App::authorize`]).
    App(Arc<app::App>),
}

/// What a request says about itself that the gate reads.
pub struct RequestInfo<'a> {
    pub headers: &'a HeaderMap,
    /// `access_token` of a WebSocket upgrade.
    pub query_token: Option<&'a str>,
    /// The core named in the path (`/@0x…`), if any.
    pub core: Option<&'a str>,
    pub peer: Option<SocketAddr>,
}

impl Gate {
    /// The caller of a request; `None` when it must be refused (HTTP 401, [`unauthorized`])
    /// before anything runs.
    pub fn caller(&self, request: &RequestInfo<'_>) -> Option<registry::Caller> {
        match self {
            Gate::Admin { secret } => authorized(request.headers, request.query_token, secret).then_some(registry::Caller::Admin),
            Gate::App(app) => Some(app.caller(request)),
        }
    }
}

/// The router of the admin API server. The `Host` check wraps every route and the fallback.
pub fn router(state: ApiState) -> Router {
    let allowed_hosts = state.allowed_hosts.clone();
    Router::new()
        .route("/", post(http::post).get(ws::upgrade))
        .route("/rpc", post(http::post).get(ws::upgrade))
        .route("/metrics", axum::routing::get(crate::metrics::metrics))
        .route("/private/{core}/{cid}", axum::routing::get(private::get_private))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(axum::middleware::from_fn_with_state(allowed_hosts, host::check_host))
        .with_state(state)
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: the API serves POST / (JSON-RPC), GET / (JSON-RPC over WebSocket), GET /metrics and GET /private/<core>/<cid> (a private object, decrypted); content is on the gateway\n",
    )
}

/// Serves the API until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await
}

/// Binds the API address with a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the API on {addr}: {e} (is another node using it? pick another with --api HOST:PORT)"))
}

/// Whether the request carries the admin secret: as `Authorization: Bearer <secret>`, or, when
/// `query_token` is given (a WebSocket upgrade, which browsers cannot give headers), as that.
fn authorized(headers: &HeaderMap, query_token: Option<&str>, secret: &str) -> bool {
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    [header_token, query_token].into_iter().flatten().any(|token| constant_time_eq(token.trim().as_bytes(), secret.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request: `Authorization: Bearer <token>`, else (a WebSocket upgrade)
/// the `access_token` query parameter.
pub fn bearer<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or(query_token)
        .map(str::trim)
}

/// The refusal of a call without the right secret (HTTP 401).
pub(crate) fn unauthorized() -> axum::response::Response {
    use axum::response::IntoResponse;
    let error = RpcError::new(
        code::UNAUTHORIZED,
        "unauthorized: send the secret from <repo>/api.cookie as 'Authorization: Bearer <secret>' \
         (on a WebSocket also accepted as ?access_token=<secret>)",
    );
    (StatusCode::UNAUTHORIZED, axum::Json(jsonrpc::error_response(Value::Null, error))).into_response()
}
