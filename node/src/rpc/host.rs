//! The admin API answers only requests addressed to one of the node's own names.
//!
//! Why: a web page can point a name it controls at 127.0.0.1 (DNS rebinding: `evil.example`
//! first resolves to the attacker's server, then to 127.0.0.1). The browser then sends the
//! page's requests to the node and lets the page read the answers — to the browser they come
//! from the page's own origin. The `Host` header still names `evil.example`, so every request
//! whose `Host` is not one of the node's names gets 403 before any handler runs: that covers
//! the JSON-RPC calls and `/metrics`, which lists every core (wallet address) the node holds.
//!
//! The node's names: `localhost`, `127.0.0.1`, `[::1]`, the IP address the API listens on
//! when it is a specific one (a literal IP cannot be rebound), and the names listed in
//! `[api] allowed_hosts`; each with or without a port.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::jsonrpc::error_response;
use super::{code, RpcError};

/// The names the API answers to, lower-case, IPv6 addresses in brackets.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    names: HashSet<String>,
}

impl AllowedHosts {
    /// The loopback names, the API's own IP address and the configured `extra` names.
    pub fn new(listen: SocketAddr, extra: &[String]) -> Self {
        let mut names: HashSet<String> = ["localhost", "127.0.0.1", "[::1]"].into_iter().map(String::from).collect();
        if !listen.ip().is_unspecified() {
            names.insert(match listen.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            });
        }
        names.extend(extra.iter().map(|name| name.trim().to_ascii_lowercase()));
        AllowedHosts { names }
    }

    /// Whether a `Host` value (`name`, `name:port`, `[v6]:port`) names this node.
    pub fn allows(&self, host: &str) -> bool {
        host_without_port(host).is_some_and(|name| self.names.contains(&name.to_ascii_lowercase()))
    }
}

/// The host part of a `Host` value, or `None` when the value is malformed (an empty host, a
/// port that is not a number, an unclosed IPv6 bracket).
fn host_without_port(value: &str) -> Option<&str> {
    let (host, port) = if value.starts_with('[') {
        let (host, rest) = value.split_at(value.find(']')? + 1);
        (host, if rest.is_empty() { None } else { Some(rest.strip_prefix(':')?) })
    } else {
        match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    let valid_port = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
    (!host.is_empty() && port.is_none_or(valid_port)).then_some(host)
}

/// Middleware: refuses a request whose `Host` is not one of the node's names with 403 and a
/// JSON-RPC error that says how to allow a name.
pub async fn check_host(State(allowed): State<Arc<AllowedHosts>>, request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    };
    match host {
        Some(host) if allowed.allows(host) => next.run(request).await,
        Some(host) => forbidden(format!(
            "forbidden: Host {host:?} is not a name of this node (localhost, 127.0.0.1, [::1]); \
             to reach the API under that name, add it to [api] allowed_hosts in config.toml"
        )),
        None => forbidden("forbidden: the request has no valid Host header".to_string()),
    }
}

fn forbidden(message: String) -> Response {
    let body = error_response(Value::Null, RpcError::new(code::FORBIDDEN_HOST, message));
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_pass_with_or_without_a_port_and_others_do_not() {
        let allowed = AllowedHosts::new("127.0.0.1:5420".parse().unwrap(), &["Kubelt.Lan".to_string()]);
        for host in ["localhost", "localhost:5420", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:5420", "[::1]", "[::1]:5420", "kubelt.lan:80"] {
            assert!(allowed.allows(host), "{host} was refused");
        }
        for host in [
            "evil.example",
            "evil.example:5420",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "localhost:",
            "localhost:x",
            "localhost:99999",
            "[::1",
            "[::1]x",
            "[::1]5420",
            "localhost:+80",
            "",
            ":5420",
            "0.0.0.0:5420",
        ] {
            assert!(!allowed.allows(host), "{host:?} was allowed");
        }
    }

    #[test]
    fn a_specific_listen_address_is_one_of_the_names() {
        let v4 = AllowedHosts::new("192.0.2.7:5420".parse().unwrap(), &[]);
        assert!(v4.allows("192.0.2.7:5420"));
        let v6 = AllowedHosts::new("[2001:db8::1]:5420".parse().unwrap(), &[]);
        assert!(v6.allows("[2001:db8::1]:5420"));
        let any = AllowedHosts::new("0.0.0.0:5420".parse().unwrap(), &[]);
        assert!(!any.allows("0.0.0.0:5420") && any.allows("localhost"));
    }
}
