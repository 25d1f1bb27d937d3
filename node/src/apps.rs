//! The example apps (`examples/<name>/` in the source tree), served by the app endpoint at
//! `/apps/<name>/...`, so that a page's origin is the endpoint its JSON-RPC calls go to: the
//! node needs no CORS for its own apps, and a sign-in names the node's own address.
//!
//! The files are embedded at build time (`build.rs` writes the table), so nothing on disk is
//! read to answer a request and no request can name a file outside the table. A path is still
//! checked before the lookup, and refused loudly rather than normalized: `.` and `..` segments,
//! any percent-encoding (`%2F`, `%2e%2e`, …), backslashes and anything but plain names are 400.
//! The app endpoint serves nothing else besides JSON-RPC: the admin API is not reachable there.

use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

mod table {
    include!(concat!(env!("OUT_DIR"), "/apps.rs"));
}

/// Where the apps are served on the app endpoint.
pub const PREFIX: &str = "/apps/";

/// What the example pages may load and connect to: only their own origin (the node), which
/// also keeps a note's text from ever running as script or loading anything from elsewhere.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// How a request under [`PREFIX`] is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The file's bytes and content type.
    File { bytes: &'static [u8], content_type: &'static str },
    /// An app's directory named without its trailing slash: redirect to `<name>/`, so that the
    /// page's relative links resolve inside it.
    Directory { location: String },
    /// Not a path this server would ever serve (400), with the reason.
    Refused(&'static str),
    /// No such file (404).
    NotFound,
}

/// Finds what `path` (the raw, still percent-encoded request path) names.
pub fn lookup(path: &str) -> Lookup {
    let Some(rest) = path.strip_prefix(PREFIX) else { return Lookup::NotFound };
    if rest.contains('%') {
        return Lookup::Refused("percent-encoded characters are not served under /apps/");
    }
    if rest.contains('\\') {
        return Lookup::Refused("backslashes are not served under /apps/");
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let (last, directories) = segments.split_last().unwrap_or((&"", &[]));
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Lookup::Refused("'.' and '..' segments are not served under /apps/");
    }
    if directories.iter().any(|s| !is_plain_name(s)) || !(last.is_empty() || is_plain_name(last)) {
        return Lookup::NotFound;
    }
    // An app is a directory: `/apps/<name>` alone is it, without its slash.
    if directories.is_empty() {
        let index = format!("{last}/index.html");
        return match find(&index) {
            Some(_) => Lookup::Directory { location: format!("{last}/") },
            None => Lookup::NotFound,
        };
    }
    let file = if last.is_empty() { format!("{rest}index.html") } else { rest.to_string() };
    match find(&file) {
        Some(bytes) => Lookup::File { bytes, content_type: content_type(&file) },
        None => Lookup::NotFound,
    }
}

/// The handler of `GET /apps/...` (and HEAD) on the app endpoint.
pub async fn serve(uri: Uri) -> Response {
    match lookup(uri.path()) {
        Lookup::File { bytes, content_type } => {
            let mut response = bytes.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            // Revalidated on every load: a node upgraded to new app files serves them at once.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
            headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            response
        }
        Lookup::Directory { location } => match HeaderValue::from_str(&location) {
            Ok(location) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, location)]).into_response(),
            Err(_) => (StatusCode::NOT_FOUND, "no such app\n").into_response(),
        },
        Lookup::Refused(reason) => (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
        Lookup::NotFound => (StatusCode::NOT_FOUND, "no such app file: the node serves its example apps at /apps/<name>/\n").into_response(),
    }
}

/// The names of the embedded apps (`notes`, …), for the log and the docs.
pub fn names() -> Vec<&'static str> {
    table::FILES.iter().filter_map(|(path, _)| path.strip_suffix("/index.html")).filter(|name| !name.contains('/')).collect()
}

fn find(path: &str) -> Option<&'static [u8]> {
    table::FILES.binary_search_by(|(name, _)| (*name).cmp(path)).ok().map(|i| table::FILES[i].1)
}

/// The same rule as `build.rs`: what is embedded is exactly what can be asked for.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn content_type(path: &str) -> &'static str {
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match extension.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notes_app_is_embedded_with_its_content_types() {
        assert!(names().contains(&"notes"), "{:?}", names());
        for (path, kind) in [
            ("/apps/notes/", "text/html; charset=utf-8"),
            ("/apps/notes/index.html", "text/html; charset=utf-8"),
            ("/apps/notes/app.js", "text/javascript; charset=utf-8"),
            ("/apps/notes/style.css", "text/css; charset=utf-8"),
            ("/apps/notes/sw.js", "text/javascript; charset=utf-8"),
        ] {
            match lookup(path) {
                Lookup::File { bytes, content_type } => {
                    assert_eq!(content_type, kind, "{path}");
                    assert!(!bytes.is_empty(), "{path} is empty");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        assert_eq!(lookup("/apps/notes"), Lookup::Directory { location: "notes/".into() });
    }

    #[test]
    fn paths_that_could_escape_are_refused_and_unknown_ones_are_not_found() {
        for path in [
            "/apps/notes/../notes/index.html",
            "/apps/../Cargo.toml",
            "/apps/notes/./app.js",
            "/apps/..",
            "/apps/notes/%2e%2e/x",
            "/apps/notes%2Fapp.js",
            "/apps/notes/app%2Ejs",
            "/apps/notes/..%2F..%2Fnode%2Fbuild.rs",
            "/apps/notes\\..\\x",
        ] {
            assert!(matches!(lookup(path), Lookup::Refused(_)), "{path}: {:?}", lookup(path));
        }
        for path in ["/apps/", "/apps/nope", "/apps/nope/", "/apps/notes/nope.js", "/apps/notes//app.js", "/apps/notes/.hidden", "/app/notes/", "/apps/notes/app.js/"] {
            assert_eq!(lookup(path), Lookup::NotFound, "{path}");
        }
    }
}
