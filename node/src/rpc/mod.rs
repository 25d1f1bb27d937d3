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
mod msg;

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
    /// No device key of the recipient core is known (yet).
    pub const MSG_NO_DEVICE_KEYS: i64 = -32020;
    /// No such message on this node.
    pub const MSG_NOT_FOUND: i64 = -32021;

    /// Every code with its meaning, for `rpc.discover`.
    pub const ALL: &[(i64, &str)] = &[
        (PARSE_ERROR, "the body is not JSON"),
        (INVALID_REQUEST, "not a JSON-RPC 2.0 request"),
        (METHOD_NOT_FOUND, "no such method"),
        (INVALID_PARAMS, "missing or invalid params (including a bad namespace, path or value)"),
        (INTERNAL_ERROR, "a bug in the node"),
        (NODE_ERROR, "the node could not do it (storage, network, stopped)"),
        (UNAUTHORIZED, "missing or wrong API secret"),
        (FORBIDDEN_HOST, "the Host header is not one of the node's names"),
        (CORE_NOT_HELD, "this node does not hold the core (follow it, or submit a delegation)"),
        (CORE_NOT_WRITABLE, "this node has no delegation to write the core"),
        (CORE_REVOKED, "this node's key was revoked by the core's owner"),
        (INVALID_STATEMENT, "not a valid delegation or revocation (the message says why)"),
        (OTHER_NODE, "the delegation authorizes another node's key"),
        (CORE_REFUSED, "the write breaks the core's rules (the message says which)"),
        (MSG_NO_DEVICE_KEYS, "no device key of the recipient core is known yet (the node follows the core to learn them; retry)"),
        (MSG_NOT_FOUND, "no message with this id on this node"),
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
    match parse_body(&body) {
        Err(reply) => Json(reply).into_response(),
        Ok(Body::Single(call)) => match run_call(&state, call).await {
            Some(reply) => Json(reply).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        Ok(Body::Batch(calls)) => {
            let mut replies = Vec::new();
            for call in calls {
                if let Some(reply) = run_call(&state, call).await {
                    replies.push(reply);
                }
            }
            match batch_reply(replies) {
                Some(reply) => Json(reply).into_response(),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
    }
}

/// The reply to a batch: its calls' replies, or nothing when every call was a notification
/// (JSON-RPC 2.0 §6: never an empty array).
fn batch_reply(replies: Vec<Value>) -> Option<Value> {
    (!replies.is_empty()).then_some(Value::Array(replies))
}

/// Most calls in one batch. A batch's calls run one after another and each gets a reply: with
/// no cap, a body at axum's 2 MB limit could queue ~100k tiny calls and build a reply ~100
/// times its size.
const MAX_BATCH: usize = 1000;

/// A request body, parsed: one call or a batch.
#[derive(Debug)]
enum Body {
    Single(Result<Call, Value>),
    Batch(Vec<Result<Call, Value>>),
}

/// One well-formed call; a malformed one is its error reply instead (a `Value`).
#[derive(Debug)]
struct Call {
    /// `None` for a notification, which gets no reply.
    id: Option<Value>,
    method: String,
    params: Value,
}

/// Parses a request body; `Err` is the single error reply to the whole body (a parse error
/// or an empty batch).
fn parse_body(body: &[u8]) -> Result<Body, Value> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| error_response(Value::Null, RpcError::new(code::PARSE_ERROR, format!("parse error: {e}"))))?;
    match request {
        Value::Array(calls) if calls.is_empty() => {
            Err(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "empty batch")))
        }
        Value::Array(calls) if calls.len() > MAX_BATCH => Err(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, format!("a batch holds at most {MAX_BATCH} calls, got {}", calls.len())),
        )),
        Value::Array(calls) => Ok(Body::Batch(calls.into_iter().map(parse_call).collect())),
        call => Ok(Body::Single(parse_call(call))),
    }
}

/// Checks one call of a request (JSON-RPC 2.0 §4); a malformed one becomes its error reply.
fn parse_call(call: Value) -> Result<Call, Value> {
    let Value::Object(mut call) = call else {
        return Err(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "a request must be a JSON object")));
    };
    let id = call.remove("id");
    // §4: an id is a string, a number or null; anything else cannot be echoed back safely.
    if matches!(id, Some(Value::Object(_) | Value::Array(_) | Value::Bool(_))) {
        return Err(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "\"id\" must be a string, a number or null"),
        ));
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if call.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"")));
    }
    let Some(Value::String(method)) = call.remove("method") else {
        return Err(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string")));
    };
    let params = call.remove("params").unwrap_or(Value::Null);
    Ok(Call { id, method, params })
}

/// Runs one call; `None` for a notification (no `id`), which gets no reply.
async fn run_call(state: &ApiState, call: Result<Call, Value>) -> Option<Value> {
    let Call { id, method, params } = match call {
        Ok(call) => call,
        Err(reply) => return Some(reply),
    };
    let result = methods::dispatch(state, &method, params).await;
    let reply_id = id?;
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

#[cfg(test)]
mod tests {
    //! The request parsing, property-tested: arbitrary bodies never panic and always get a
    //! JSON-RPC answer, every rule of §4 decides valid from invalid, valid calls round-trip.
    //! `PROPTEST_CASES=N` sets the cases per property (default 4000).

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    fn runner() -> TestRunner {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
    }

    /// Any JSON value, nested a few levels.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Finite floats that serde_json reads back exactly (without its `float_roundtrip`
            // feature a few lose their last bit, which no method of this API cares about).
            any::<f64>()
                .prop_filter("JSON floats are finite and read back exactly", |f| {
                    f.is_finite() && serde_json::from_str::<f64>(&Value::from(*f).to_string()).ok() == Some(*f)
                })
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
            prop::sample::select(vec!["2.0", "1.0", "node_id", "id", "jsonrpc", "method", "params"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(vec!["jsonrpc", "method", "params", "id", "x"]), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    /// A call as a client would write it: `(id, method, params)`, `id: None` a notification.
    fn arb_call() -> impl Strategy<Value = (Option<Value>, String, Value)> {
        let id = prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<i64>().prop_map(|n| Some(Value::from(n))),
            ".{0,12}".prop_map(|s| Some(Value::from(s))),
        ];
        let params = prop_oneof![Just(Value::Null), prop::collection::vec(arb_json(), 0..3).prop_map(Value::Array), arb_json()];
        (id, ".{0,16}", params)
    }

    fn call_json((id, method, params): &(Option<Value>, String, Value)) -> Value {
        let mut call = json!({ "jsonrpc": "2.0", "method": method });
        if !params.is_null() {
            call["params"] = params.clone();
        }
        if let Some(id) = id {
            call["id"] = id.clone();
        }
        call
    }

    /// An error reply: JSON-RPC 2.0 shape, with the given code.
    fn is_error_reply(reply: &Value, codes: &[i64]) -> bool {
        reply["jsonrpc"] == "2.0"
            && reply.get("id").is_some()
            && reply["error"]["message"].is_string()
            && reply["error"]["code"].as_i64().is_some_and(|c| codes.contains(&c))
    }

    /// What §4 says about one call: whether it is valid.
    fn valid_call(call: &Value) -> bool {
        let Value::Object(map) = call else { return false };
        map.get("jsonrpc") == Some(&json!("2.0"))
            && map.get("method").is_some_and(Value::is_string)
            && !matches!(map.get("id"), Some(Value::Object(_) | Value::Array(_) | Value::Bool(_)))
    }

    fn check_call(call: &Value, parsed: &Result<Call, Value>) -> Result<(), TestCaseError> {
        match parsed {
            Ok(parsed) => {
                prop_assert!(valid_call(call), "{call} accepted");
                prop_assert_eq!(&parsed.id, &call.get("id").cloned());
                prop_assert_eq!(Some(&Value::from(parsed.method.clone())), call.get("method"));
                prop_assert_eq!(&parsed.params, call.get("params").unwrap_or(&Value::Null));
            }
            Err(reply) => {
                prop_assert!(!valid_call(call), "{call} refused: {reply}");
                prop_assert!(is_error_reply(reply, &[code::INVALID_REQUEST]), "{reply}");
            }
        }
        Ok(())
    }

    #[test]
    fn arbitrary_bodies_never_panic_and_get_a_parse_or_request_error() {
        let strategy = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            arb_json().prop_map(|v| v.to_string().into_bytes()),
            // A valid call with one member replaced by any value, or removed.
            (arb_call(), prop::sample::select(vec!["jsonrpc", "method", "params", "id"]), prop::option::of(arb_json())).prop_map(
                |(c, member, value)| {
                    let mut call = call_json(&c);
                    if let Some(map) = call.as_object_mut() {
                        match value {
                            Some(value) => map.insert(member.to_string(), value),
                            None => map.remove(member),
                        };
                    }
                    call.to_string().into_bytes()
                }
            ),
            (arb_call(), any::<usize>(), any::<u8>()).prop_map(|(c, at, bit)| {
                // A valid call with one bit flipped.
                let mut bytes = call_json(&c).to_string().into_bytes();
                let at = at % bytes.len();
                bytes[at] ^= 1 << (bit % 8);
                bytes
            }),
        ];
        runner()
            .run(&strategy, |body| {
                match parse_body(&body) {
                    Err(reply) => prop_assert!(is_error_reply(&reply, &[code::PARSE_ERROR, code::INVALID_REQUEST]), "{reply}"),
                    Ok(Body::Single(call)) => {
                        let value: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        check_call(&value, &call)?;
                    }
                    Ok(Body::Batch(calls)) => {
                        let value: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let items = value.as_array().ok_or_else(|| TestCaseError::fail("a batch from a non-array"))?;
                        prop_assert!(!items.is_empty() && items.len() <= MAX_BATCH);
                        prop_assert_eq!(items.len(), calls.len());
                        for (item, call) in items.iter().zip(&calls) {
                            check_call(item, call)?;
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn valid_calls_and_batches_round_trip_and_truncations_are_parse_errors() {
        let strategy = (prop::collection::vec(arb_call(), 1..5), any::<bool>(), any::<usize>());
        runner()
            .run(&strategy, |(calls, batch, cut)| {
                let body = if batch {
                    Value::Array(calls.iter().map(call_json).collect())
                } else {
                    call_json(&calls[0])
                };
                let text = body.to_string();
                let parsed = parse_body(text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let parsed = match parsed {
                    Body::Single(call) => vec![call],
                    Body::Batch(calls) => calls,
                };
                prop_assert_eq!(parsed.len(), if batch { calls.len() } else { 1 });
                for ((id, method, params), got) in calls.iter().zip(parsed) {
                    let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&got.id, id);
                    prop_assert_eq!(&got.method, method);
                    prop_assert_eq!(&got.params, params);
                }
                // A request cut short is never another request.
                let cut = cut % text.len();
                let reply = parse_body(&text.as_bytes()[..cut]).err().ok_or_else(|| TestCaseError::fail("cut body parsed"))?;
                prop_assert!(is_error_reply(&reply, &[code::PARSE_ERROR]), "{reply}");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn id_that_is_not_a_string_number_or_null_is_an_invalid_request() {
        for id in [json!({"a": 1}), json!([1]), json!(true)] {
            let body = json!({"jsonrpc": "2.0", "method": "node_id", "id": id}).to_string();
            let Ok(Body::Single(Err(reply))) = parse_body(body.as_bytes()) else { panic!("{body} accepted") };
            assert_eq!(reply["error"]["code"], code::INVALID_REQUEST);
            assert_eq!(reply["id"], Value::Null);
        }
    }

    #[test]
    fn batch_of_notifications_gets_no_reply() {
        // It used to get `[]`, which §6 forbids.
        assert_eq!(batch_reply(vec![]), None);
        assert_eq!(batch_reply(vec![json!(1)]), Some(json!([1])));
    }

    #[test]
    fn oversized_batch_is_refused_as_a_whole() {
        let call = json!({"jsonrpc": "2.0", "method": "node_id", "id": 1});
        let body = Value::Array(vec![call; MAX_BATCH + 1]).to_string();
        let reply = parse_body(body.as_bytes()).unwrap_err();
        assert_eq!(reply["error"]["code"], code::INVALID_REQUEST);
        assert!(matches!(parse_body(b"[]"), Err(reply) if reply["error"]["code"] == code::INVALID_REQUEST));
    }
}
