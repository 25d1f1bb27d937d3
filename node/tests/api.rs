//! The JSON-RPC API of a running node: authentication, error codes, the `Host` check, the
//! gateway on its own origin, `rpc.discover` against what dispatches, and metrics that move.

mod common;

use std::time::Duration;

use common::{kubelt, kubelt_ok, wait_until, TestNode};
use serde_json::Value;

#[test]
fn api_refuses_calls_without_the_secret_and_reports_json_rpc_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "api", &[])?;
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"node_id"}"#;

    let (status, reply) = node.post_raw(call, None)?;
    assert_eq!(status, 401);
    assert_eq!(reply["error"]["code"], -32001);
    assert!(reply.get("result").is_none());

    let (status, reply) = node.post_raw(call, Some("not-the-secret"))?;
    assert_eq!(status, 401);
    assert_eq!(reply["error"]["code"], -32001);

    let (status, reply) = node.post_raw(call, Some(node.secret()))?;
    assert_eq!(status, 200);
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["result"]["peer_id"], Value::String(node.peer_id.clone()));

    let (_, reply) = node.post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"no_such_method"}"#, Some(node.secret()))?;
    assert_eq!(reply["error"]["code"], -32601);
    assert!(reply["error"]["message"].as_str().unwrap_or("").contains("no_such_method"));

    let (_, reply) = node.post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"#, Some(node.secret()))?;
    assert_eq!(reply["error"]["code"], -32700);

    let (_, reply) = node.post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"swarm_connect","params":{"addr":"/ip4/nope"}}"#, Some(node.secret()))?;
    assert_eq!(reply["error"]["code"], -32602);

    // Prometheus metrics need no secret.
    let metrics = ureq::get(&format!("{}metrics", node.api_url())).call()?.into_string()?;
    assert!(metrics.contains("kubelt_connected_peers 0"), "{metrics}");
    assert!(metrics.contains("kubelt_bitswap_blocks_sent_total 0"), "{metrics}");

    let discover = node.call("rpc.discover", Value::Null)?;
    assert_eq!(discover["openrpc"], "1.2.6");
    let names: Vec<&str> = discover["methods"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
    for expected in ["node_id", "swarm_peers", "swarm_connect", "node_status"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    Ok(())
}

/// A request's status, headers and body, whatever the status.
fn send(request: ureq::Request, body: Option<&str>) -> anyhow::Result<(u16, ureq::Response)> {
    let result = match body {
        Some(body) => request.send_string(body),
        None => request.call(),
    };
    match result {
        Ok(response) => Ok((response.status(), response)),
        Err(ureq::Error::Status(code, response)) => Ok((code, response)),
        Err(e) => Err(e.into()),
    }
}

/// DNS rebinding: a page on `evil.example` that resolves to 127.0.0.1 must not read the API
/// or /metrics (which names every core the node holds); the node's own names still work.
#[test]
fn the_api_and_metrics_refuse_a_host_that_is_not_the_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "api", &[])?;
    let port = node.api_url().trim_end_matches('/').rsplit(':').next().unwrap_or_default().to_string();
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"node_id"}"#;
    let bearer = format!("Bearer {}", node.secret());
    let metrics_url = format!("{}metrics", node.api_url());

    for host in ["evil.example", &format!("evil.example:{port}"), "localhost.evil.example", "127.0.0.1.evil.example"] {
        let (status, response) = send(ureq::get(&metrics_url).set("Host", host), None)?;
        let text = response.into_string()?;
        assert_eq!(status, 403, "/metrics with Host {host}: {text}");
        assert!(text.contains("allowed_hosts") && !text.contains("kubelt_"), "/metrics with Host {host}: {text}");

        let (status, response) = send(ureq::post(node.api_url()).set("Host", host).set("Authorization", &bearer), Some(call))?;
        let reply: Value = response.into_json()?;
        assert_eq!(status, 403, "POST / with Host {host}: {reply}");
        assert_eq!(reply["error"]["code"], -32002, "{reply}");
        assert!(reply["error"]["message"].as_str().unwrap_or_default().contains("not a name of this node"), "{reply}");
        assert!(reply.get("result").is_none(), "{reply}");
    }

    for host in ["localhost".to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), "[::1]".to_string()] {
        let (status, response) = send(ureq::get(&metrics_url).set("Host", &host), None)?;
        assert_eq!(status, 200, "/metrics with Host {host}");
        assert!(response.into_string()?.contains("kubelt_connected_peers"));
        let (status, response) = send(ureq::post(node.api_url()).set("Host", &host).set("Authorization", &bearer), Some(call))?;
        let reply: Value = response.into_json()?;
        assert_eq!((status, &reply["result"]["peer_id"]), (200, &Value::String(node.peer_id.clone())), "POST / with Host {host}");
    }
    Ok(())
}

#[test]
fn every_method_rpc_discover_lists_is_dispatched() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "api", &[])?;
    let discover = node.call("rpc.discover", Value::Null)?;
    let methods = discover["methods"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = methods.iter().filter_map(|m| m["name"].as_str()).collect();
    // The README's groups are all there.
    for prefix in ["node_", "swarm_", "content_", "pin_", "repo_", "dag_", "core_", "dht_"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "no {prefix}* method in {names:?}");
    }
    // Each listed method with every param it declares set to junk: the call reaches the
    // method's own code, which refuses the junk (or, without params, answers). Never "method
    // not found", never "described but not implemented".
    let documented: Vec<Value> = discover["components"]["errors"]
        .as_object()
        .map(|errors| errors.values().map(|e| e["code"].clone()).collect())
        .unwrap_or_default();
    assert!(documented.contains(&Value::from(-32010)), "rpc.discover documents the error codes: {documented:?}");
    for method in &methods {
        let name = method["name"].as_str().unwrap_or_default();
        let params: serde_json::Map<String, Value> = method["params"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .map(|p| (p.to_string(), Value::from("junk")))
            .collect();
        let body = serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": name, "params": params }).to_string();
        let (status, reply) = node.post_raw(&body, Some(node.secret()))?;
        assert_eq!(status, 200, "{name}: {reply}");
        if let Some(error) = reply.get("error") {
            assert_ne!(error["code"], -32601, "{name} is listed but not dispatched: {reply}");
            assert!(documented.contains(&error["code"]), "{name} answered an undocumented error code: {reply}");
        } else {
            assert!(reply.get("result").is_some(), "{name}: {reply}");
        }
    }
    Ok(())
}

/// Content anyone can publish is served on the gateway's own port, sandboxed and never
/// sniffed into another type; the admin port does not serve it at all.
#[test]
fn the_gateway_has_its_own_origin_and_sandboxes_everything_it_serves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "gw", &[])?;
    assert_ne!(node.gateway_url(), node.api_url());
    let page = dir.path().join("page");
    std::fs::write(&page, "<!DOCTYPE html><script>fetch('/metrics')</script>\n")?;
    let cid = kubelt_ok(&node.repo, &["add", "-q", page.to_str().unwrap_or_default()])?;

    let gateway = node.gateway_url();
    for (path, expected_status) in [
        (format!("ipfs/{cid}"), 200),
        (format!("ipfs/{cid}?format=raw"), 200),
        ("ipfs/not-a-cid".to_string(), 400),
        (format!("ipfs/{cid}/nope"), 404),
        ("metrics".to_string(), 404),
        (String::new(), 404),
    ] {
        let (status, response) = send(ureq::get(&format!("{gateway}{path}")), None)?;
        assert_eq!(status, expected_status, "GET /{path}");
        assert_eq!(response.header("content-security-policy"), Some("sandbox"), "GET /{path}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "GET /{path}");
    }
    let (_, response) = send(ureq::get(&format!("{gateway}ipfs/{cid}")), None)?;
    assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"));

    // A directory listing escapes the requested path: its names are anyone's.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("<img src=x onerror=alert(1)>"))?;
    std::fs::write(tree.join("<img src=x onerror=alert(1)>/file"), "x")?;
    let tree_cid = kubelt_ok(&node.repo, &["add", "-r", "-q", tree.to_str().unwrap_or_default()])?;
    let (status, response) = send(ureq::get(&format!("{gateway}ipfs/{tree_cid}/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")), None)?;
    let listing = response.into_string()?;
    assert_eq!(status, 200, "{listing}");
    assert!(listing.contains("&lt;img src=x") && !listing.contains("<img"), "{listing}");

    let (status, response) = send(ureq::get(&format!("{}ipfs/{cid}", node.api_url())), None)?;
    let text = response.into_string()?;
    assert_eq!(status, 404, "the admin port served content: {text}");
    assert!(!text.contains("<script>"), "{text}");
    Ok(())
}

/// The value of one sample (`name` with its labels, exactly as exposed) in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

fn metrics(node: &TestNode) -> anyhow::Result<String> {
    Ok(ureq::get(&format!("{}metrics", node.api_url())).call()?.into_string()?)
}

/// Waits until a sample of `node`'s metrics satisfies `check`.
fn wait_for_sample(node: &TestNode, name: &str, check: impl Fn(f64) -> bool) -> anyhow::Result<()> {
    wait_until(&format!("{name} on {}", node.name), Duration::from_secs(20), || Ok(sample(&metrics(node)?, name).is_some_and(&check)))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", metrics(node).unwrap_or_default()))
}

#[test]
fn metrics_move_with_peers_transfers_and_core_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &["--peer", &a.tcp_addr()])?;
    for node in [&a, &b] {
        wait_for_sample(node, "kubelt_connected_peers", |v| v == 1.0)?;
        wait_for_sample(node, "kubelt_connections_established_total", |v| v >= 1.0)?;
    }

    // 1 MiB from a to b: a root and four leaves.
    let file = dir.path().join("file.bin");
    std::fs::write(&file, common::pseudo_random(1024 * 1024, 41))?;
    let cid = kubelt_ok(&a.repo, &["add", "-q", file.to_str().unwrap_or_default()])?;
    assert_eq!(kubelt(&b.repo, &["cat", &cid])?.stdout.len(), 1024 * 1024);
    let text_a = metrics(&a)?;
    let text_b = metrics(&b)?;
    // At least the five blocks (a retried request may send one twice); received counts each
    // verified block once.
    assert!(sample(&text_a, "kubelt_bitswap_blocks_sent_total").is_some_and(|v| v >= 5.0), "{text_a}");
    assert!(sample(&text_a, "kubelt_bitswap_sent_bytes_total").is_some_and(|v| v >= 1024.0 * 1024.0), "{text_a}");
    assert_eq!(sample(&text_b, "kubelt_bitswap_blocks_received_total"), Some(5.0), "{text_b}");
    assert!(sample(&text_b, "kubelt_bitswap_received_bytes_total").is_some_and(|v| v >= 1024.0 * 1024.0), "{text_b}");
    assert_eq!(sample(&text_b, "kubelt_bitswap_blocks_sent_total"), Some(0.0), "{text_b}");

    // Three writes on a, followed by b.
    let key = dir.path().join("owner.key");
    let address = kubelt_ok(dir.path(), &["core", "dev-wallet", "--create", key.to_str().unwrap_or_default()])?;
    let message = kubelt_ok(&a.repo, &["core", "delegate", &address])?;
    let message_file = dir.path().join("d.siwe");
    std::fs::write(&message_file, message)?;
    kubelt_ok(&a.repo, &["core", "submit", "--message-file", message_file.to_str().unwrap_or_default(), "--sign-with", key.to_str().unwrap_or_default()])?;
    kubelt_ok(&b.repo, &["core", "follow", &address])?;
    for i in 0..3 {
        kubelt_ok(&a.repo, &["core", "set", &address, "app", &format!("k{i}"), &i.to_string()])?;
    }
    let changes = format!("kubelt_core_changes{{core=\"{address}\"}}");
    let replicas = format!("kubelt_core_replicas_online{{core=\"{address}\"}}");
    for node in [&a, &b] {
        wait_for_sample(node, "kubelt_cores_held", |v| v == 1.0)?;
        // The three writes, and a's device key (a writer publishes its messaging key).
        wait_for_sample(node, &changes, |v| v == 4.0)?;
        wait_for_sample(node, &replicas, |v| v == 1.0)?;
    }
    Ok(())
}

/// Core commands fail with a code per kind of failure, as `rpc.discover` documents them, so an
/// app can tell "not held" from "not writable" from bad input.
#[test]
fn core_command_failures_have_their_own_codes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "codes", &[])?;
    let core = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
    let call = |method: &str, params: Value| -> anyhow::Result<Value> {
        let body = serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }).to_string();
        let (_, reply) = node.post_raw(&body, Some(node.secret()))?;
        Ok(reply["error"].clone())
    };
    let set = serde_json::json!({ "address": core, "namespace": "profile", "path": "name", "value": "x" });
    let error = call("core_set", set.clone())?;
    assert_eq!(error["code"], -32010, "a core this node does not hold: {error}");
    assert!(error["message"].as_str().unwrap_or_default().contains("does not hold"), "{error}");
    node.call("core_follow", serde_json::json!({ "address": core }))?;
    let error = call("core_set", set)?;
    assert_eq!(error["code"], -32011, "a followed core without a delegation: {error}");
    let error = call("core_get", serde_json::json!({ "address": core, "namespace": "profile", "path": "a//b" }))?;
    assert_eq!(error["code"], -32602, "a bad path is invalid params: {error}");
    Ok(())
}
