//! Read-only HTTP gateway: `GET /ipfs/<cid>[/<path>]`, as Kubo's path gateway serves it.
//!
//! Files stream with their length and a content type (from the name's extension, else sniffed
//! from the first bytes); directories serve their `index.html` or a listing. `?format=car` (or
//! `Accept: application/vnd.ipld.car`) returns the DAG as a CAR v1 stream and `?format=raw` the
//! root block, as in the trustless gateway spec. No API secret is needed: the gateway only
//! reads content addressed by hash. Missing blocks are fetched over bitswap.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use kubelt_protocol::car;
use kubelt_protocol::node::NetworkBlocks;
use kubelt_protocol::unixfs::{self, BlockSource, EntryKind, UnixfsError};

use crate::rpc::ApiState;

#[derive(Debug, Deserialize)]
pub struct GatewayQuery {
    format: Option<String>,
}

/// `GET /ipfs/*path`.
pub async fn get_ipfs(
    State(state): State<ApiState>,
    Path(path): Path<String>,
    Query(query): Query<GatewayQuery>,
    headers: HeaderMap,
) -> Response {
    match serve(state, &path, query, &headers).await {
        Ok(response) => response,
        Err((status, message)) => (status, format!("{message}\n")).into_response(),
    }
}

type GatewayError = (StatusCode, String);

fn status_of(error: &UnixfsError) -> StatusCode {
    match error {
        UnixfsError::InvalidPath { .. } => StatusCode::BAD_REQUEST,
        UnixfsError::PathNotFound { .. } | UnixfsError::NotADirectory { .. } => StatusCode::NOT_FOUND,
        UnixfsError::HashMismatch(_) => StatusCode::BAD_GATEWAY,
        UnixfsError::BlockNotFound(_) | UnixfsError::Source(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn fail(error: UnixfsError) -> GatewayError {
    (status_of(&error), error.to_string())
}

async fn serve(state: ApiState, path: &str, query: GatewayQuery, headers: &HeaderMap) -> Result<Response, GatewayError> {
    let source = NetworkBlocks::new(state.store.clone(), state.client.clone())
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let cid = unixfs::resolve(&source, path).await.map_err(fail)?;
    let wants_car = query.format.as_deref() == Some("car")
        || headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/vnd.ipld.car"));
    if wants_car {
        let (reader, writer) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            if let Err(e) = car::export_car_async(&source, cid, writer).await {
                tracing::warn!(%cid, "CAR export through the gateway failed: {e}");
            }
        });
        return Ok(with_type(Body::from_stream(tokio_util::io::ReaderStream::new(reader)), "application/vnd.ipld.car", None));
    }
    if query.format.as_deref() == Some("raw") {
        let block = source.get(cid).await.map_err(fail)?;
        let len = block.len() as u64;
        return Ok(with_type(Body::from(block), "application/vnd.ipld.raw", Some(len)));
    }
    if let Some(format) = query.format {
        return Err((StatusCode::BAD_REQUEST, format!("unsupported format '{format}' (use car or raw)")));
    }
    let stat = unixfs::stat(&source, cid).await.map_err(fail)?;
    match stat.kind {
        EntryKind::Directory | EntryKind::HamtDirectory => {
            let entries = unixfs::ls(&source, cid).await.map_err(fail)?;
            if let Some(index) = entries.iter().find(|e| e.name == "index.html") {
                let index_stat = unixfs::stat(&source, index.cid).await.map_err(fail)?;
                return Ok(file_response(source, index.cid, index_stat.size, "index.html").await);
            }
            let base = format!("/ipfs/{}", path.trim_end_matches('/'));
            let mut html = format!("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{base}</title></head><body><h1>{base}</h1><ul>\n");
            for entry in entries {
                let name = html_escape(&entry.name);
                html.push_str(&format!("<li><a href=\"{base}/{name}\">{name}</a> {}</li>\n", entry.cid));
            }
            html.push_str("</ul></body></html>\n");
            Ok(with_type(Body::from(html), "text/html; charset=utf-8", None))
        }
        EntryKind::File => {
            let name = path.rsplit('/').next().unwrap_or("");
            Ok(file_response(source, cid, stat.size, name).await)
        }
        other => Err((StatusCode::NOT_IMPLEMENTED, format!("cannot serve a {}", other.name()))),
    }
}

async fn file_response(source: NetworkBlocks, cid: cid::Cid, size: u64, name: &str) -> Response {
    let mut stream = Box::pin(unixfs::cat(source, cid));
    let first = match stream.next().await {
        None => bytes::Bytes::new(),
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => return fail(e).into_response(),
    };
    let content_type = content_type(name, &first);
    let rest = stream.map(|r| r.map_err(std::io::Error::other));
    let body = Body::from_stream(futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(rest));
    with_type(body, content_type, Some(size))
}

fn with_type(body: Body, content_type: &str, len: Option<u64>) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=29030400, immutable"));
    response
}

/// The content type from the file name's extension, else from the first bytes.
fn content_type(name: &str, head: &[u8]) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let by_ext = match ext.as_str() {
        "html" | "htm" => Some("text/html; charset=utf-8"),
        "txt" | "md" => Some("text/plain; charset=utf-8"),
        "css" => Some("text/css; charset=utf-8"),
        "js" | "mjs" => Some("text/javascript; charset=utf-8"),
        "json" => Some("application/json"),
        "svg" => Some("image/svg+xml"),
        "png" => Some("image/png"),
        "jpg" | "jpeg" => Some("image/jpeg"),
        "gif" => Some("image/gif"),
        "webp" => Some("image/webp"),
        "pdf" => Some("application/pdf"),
        "wasm" => Some("application/wasm"),
        "mp4" => Some("video/mp4"),
        "mp3" => Some("audio/mpeg"),
        "car" => Some("application/vnd.ipld.car"),
        _ => None,
    };
    by_ext.unwrap_or_else(|| sniff(head))
}

fn sniff(head: &[u8]) -> &'static str {
    const SIGNATURES: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF8", "image/gif"),
        (b"%PDF-", "application/pdf"),
        (b"\x00asm", "application/wasm"),
        (b"<!DOCTYPE html", "text/html; charset=utf-8"),
        (b"<html", "text/html; charset=utf-8"),
    ];
    if let Some((_, t)) = SIGNATURES.iter().find(|(sig, _)| head.starts_with(sig)) {
        return t;
    }
    let sample = &head[..head.len().min(512)];
    if !sample.is_empty() && std::str::from_utf8(sample).is_ok() && !sample.contains(&0) {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_comes_from_the_extension_then_the_bytes() {
        assert_eq!(content_type("a.PNG", b""), "image/png");
        assert_eq!(content_type("noext", b"\x89PNG\r\n\x1a\nxxxx"), "image/png");
        assert_eq!(content_type("noext", b"hello"), "text/plain; charset=utf-8");
        assert_eq!(content_type("noext", &[0, 1, 2, 255]), "application/octet-stream");
    }
}
