//! The local admin API: JSON-RPC 2.0 over HTTP (`POST /`) on 127.0.0.1, described by an
//! OpenRPC document at `rpc.discover`, and Prometheus metrics at `GET /metrics`.
//!
//! Every JSON-RPC call must carry the secret the node wrote to `<repo>/api.cookie`, as
//! `Authorization: Bearer <secret>`, so that other local users cannot drive the node. Every
//! request must name the node in its `Host` header ([`host`]), so that web pages cannot reach
//! the API through DNS rebinding. The gateway is not here: it serves content anyone can
//! publish, so it runs on its own listener, another origin (`crate::gateway`).
//!
//! Errors follow JSON-RPC 2.0: -32700 parse error, -32600 invalid request, -32601 unknown
//! method, -32602 invalid params, -32603 internal error; -32001 is a missing or wrong secret,
//! -32002 a `Host` that is not the node's (HTTP 403) and -32000 an error of the node itself
//! (its message says what went wrong).

mod content;
mod core;
mod host;
mod methods;

pub use host::AllowedHosts;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use kubelt_protocol::node::Client;
use kubelt_protocol::store::Store;


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
    fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub client: Client,
    pub store: Store,
    /// The secret from `api.cookie`.
    pub secret: Arc<str>,
    /// Keeps GC out while an add has not pinned its root yet.
    pub gc_lock: crate::content::GcLock,
    /// The `Host` names the API answers to.
    pub allowed_hosts: Arc<AllowedHosts>,
}

/// The router of the admin API server. The `Host` check wraps every route and the fallback.
pub fn router(state: ApiState) -> Router {
    let allowed_hosts = state.allowed_hosts.clone();
    Router::new()
        .route("/", post(json_rpc))
        .route("/rpc", post(json_rpc))
        .route("/metrics", axum::routing::get(crate::metrics::metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(allowed_hosts, host::check_host))
        .with_state(state)
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: the API serves POST / (JSON-RPC) and GET /metrics; content is on the gateway\n")
}

/// Serves the API until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// Binds the API address with a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the API on {addr}: {e} (is another node using it? pick another with --api HOST:PORT)"))
}

fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq(token.trim().as_bytes(), secret.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error_response(id: Value, error: RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "error": error.to_json(), "id": id })
}

async fn json_rpc(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&headers, &state.secret) {
        let error = RpcError::new(
            code::UNAUTHORIZED,
            "unauthorized: send the secret from <repo>/api.cookie as 'Authorization: Bearer <secret>'",
        );
        return (StatusCode::UNAUTHORIZED, Json(error_response(Value::Null, error))).into_response();
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let error = RpcError::new(code::PARSE_ERROR, format!("parse error: {e}"));
            return Json(error_response(Value::Null, error)).into_response();
        }
    };
    match request {
        Value::Array(calls) if calls.is_empty() => {
            Json(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "empty batch"))).into_response()
        }
        Value::Array(calls) => {
            let mut replies = Vec::with_capacity(calls.len());
            for call in calls {
                if let Some(reply) = handle_call(&state, call).await {
                    replies.push(reply);
                }
            }
            Json(Value::Array(replies)).into_response()
        }
        call => match handle_call(&state, call).await {
            Some(reply) => Json(reply).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
    }
}

/// Runs one call; `None` for a notification (no `id`), which gets no reply.
async fn handle_call(state: &ApiState, call: Value) -> Option<Value> {
    let Value::Object(mut call) = call else {
        return Some(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "a request must be a JSON object")));
    };
    let id = call.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if call.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"")));
    }
    let Some(Value::String(method)) = call.remove("method") else {
        return Some(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string")));
    };
    let params = call.remove("params").unwrap_or(Value::Null);
    let result = methods::dispatch(state, &method, params).await;
    id.as_ref()?;
    Some(match result {
        Ok(value) => json!({ "jsonrpc": "2.0", "result": value, "id": reply_id }),
        Err(error) => {
            if error.code == code::INTERNAL_ERROR || error.code == code::NODE_ERROR {
                tracing::warn!(%method, "API call failed: {}", error.message);
            }
            error_response(reply_id, error)
        }
    })
}
