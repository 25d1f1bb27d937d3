//! JSON-RPC over HTTP: `POST /` with one call or a batch in the body. The same handler serves
//! every endpoint: the state's [`super::Gate`] says who calls, its registry what may be called.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::registry::Ctx;
use super::{code, jsonrpc, ApiState, RequestInfo, RpcError, MAX_REQUEST_BYTES};

/// The client's address, when the server was started with connect info (both endpoints are).
pub(super) struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)))
    }
}

/// `POST /`, and on the app endpoint also `POST /@<core>` for clients that name the core in
/// the path (as the original Kubelt API did): a token of another core is then refused.
pub(super) async fn post(
    State(state): State<ApiState>,
    core: Option<Path<String>>,
    peer: PeerAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(state, peer, headers, core.map(|Path(core)| core), body).await
}

async fn serve(
    state: ApiState,
    peer: PeerAddr,
    headers: HeaderMap,
    core: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = RequestInfo { headers: &headers, query_token: None, core: core.as_deref(), peer: peer.0 };
    let Some(caller) = state.gate.caller(&request) else {
        return super::unauthorized();
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let error = RpcError::new(
                code::REQUEST_TOO_LARGE,
                format!("request too large: the API reads at most {MAX_REQUEST_BYTES} bytes (2 MiB) per request"),
            );
            return (StatusCode::PAYLOAD_TOO_LARGE, Json(jsonrpc::error_response(Value::Null, error))).into_response();
        }
        Err(rejection) => {
            let error = RpcError::new(code::PARSE_ERROR, format!("cannot read the request body: {rejection}"));
            return (StatusCode::BAD_REQUEST, Json(jsonrpc::error_response(Value::Null, error))).into_response();
        }
    };
    match jsonrpc::run_body(&Ctx::new(state, caller, None), &body).await {
        Some(reply) => Json(reply).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}
