//! Read-only HTTP gateway: `GET /ipfs/<cid>[/<path>]`, as Kubo's path gateway serves it.
//!
//! Files stream with their length and a content type (from the name's extension, else sniffed
//! from the first bytes); directories serve their `index.html` or a listing. `?format=car` (or
//! `Accept: application/vnd.ipld.car`) returns the DAG as a CAR v1 stream and `?format=raw` the
//! root block, as in the trustless gateway spec. No API secret is needed: the gateway only
//! reads content addressed by hash. Missing blocks are fetched over bitswap. Private objects
//! (`kubelt add --private`, `kb_putObject` with `visibility: "private"`) are served as what
//! they are stored as, ciphertext: the gateway holds no key and never decrypts.
//!
//! Anyone can publish what the gateway serves, HTML and scripts included, so it never shares
//! an origin with anything that holds authority: it has its own listener (`[gateway] listen`,
//! default 127.0.0.1:5422), apart from the admin API and `/metrics`, and every response carries
//! `Content-Security-Policy: sandbox` (the page runs in an opaque origin, without scripts) and
//! `X-Content-Type-Options: nosniff` (a browser never runs a file as a type it was not served
//! as).

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;

use kubelt_protocol::car;
use kubelt_protocol::node::{Client, NetworkBlocks};
use kubelt_protocol::store::Store;
use kubelt_protocol::unixfs::{self, BlockSource, EntryKind, UnixfsError};

/// What the gateway reads from: the store, and the node to fetch missing blocks. No secret.
#[derive(Clone)]
pub struct GatewayState {
    pub client: Client,
    pub store: Store,
}

/// The gateway's router: `/ipfs/*path`, with the isolation headers on every response (the
/// fallback's 404 included).
pub fn router(state: GatewayState) -> Router {
    Router::new()
        .route("/ipfs/{*path}", axum::routing::get(get_ipfs))
        .fallback(not_found)
        .layer(axum::middleware::map_response(isolate))
        .with_state(state)
}

/// Binds the gateway address with a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for the gateway on {addr}: {e} (is another node using it? pick another with --gateway HOST:PORT)")
    })
}

/// Serves the gateway until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: GatewayState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// Adds the headers that keep served content from acting in the gateway's origin.
async fn isolate(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: the gateway serves GET /ipfs/<cid>[/path]\n")
}

#[derive(Debug, Deserialize)]
pub struct GatewayQuery {
    format: Option<String>,
}

/// `GET /ipfs/*path`.
async fn get_ipfs(
    State(state): State<GatewayState>,
    Path(path): Path<String>,
    Query(query): Query<GatewayQuery>,
    headers: HeaderMap,
) -> Response {
    match serve_path(state, &path, query, &headers).await {
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

async fn serve_path(state: GatewayState, path: &str, query: GatewayQuery, headers: &HeaderMap) -> Result<Response, GatewayError> {
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
            // The path is the requester's and its segments are names anyone can publish.
            let base = html_escape(&format!("/ipfs/{}", path.trim_end_matches('/')));
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
        // A private object (`kbobj1`): ciphertext, which the gateway serves as is.
        (b"kbobj1", "application/octet-stream"),
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
