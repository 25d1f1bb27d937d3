//! The JSON-RPC API of a running node: authentication and error codes.

mod common;

use common::TestNode;
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
