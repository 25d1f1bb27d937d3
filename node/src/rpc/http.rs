//! JSON-RPC over HTTP: `POST /` with one call or a batch in the body.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::registry::Ctx;
use super::{authorized, code, jsonrpc, unauthorized, ApiState, RpcError, MAX_REQUEST_BYTES};

pub(super) async fn post(State(state): State<ApiState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    if !authorized(&headers, None, &state.secret) {
        return unauthorized();
    }
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
    match jsonrpc::run_body(&Ctx::admin(state, None), &body).await {
        Some(reply) => Json(reply).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}
