//! The JSON-RPC methods: one table describes them (for `rpc.discover`) and `dispatch` runs them.

use serde_json::{json, Map, Value};

use super::{code, ApiState, RpcError};

/// One parameter of a method, for the OpenRPC document and for positional params.
pub struct Param {
    pub name: &'static str,
    pub schema: &'static str,
    pub required: bool,
    pub summary: &'static str,
}

/// One method, as `rpc.discover` describes it.
pub struct MethodDoc {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: &'static [Param],
    /// JSON schema of the result, as JSON text.
    pub result: &'static str,
}

const STRING: &str = r#"{"type":"string"}"#;
const BOOL: &str = r#"{"type":"boolean"}"#;
const INT: &str = r#"{"type":"integer"}"#;

/// Every method the API serves.
pub const METHODS: &[MethodDoc] = &[
    MethodDoc {
        name: "rpc.discover",
        summary: "This API's OpenRPC document.",
        params: &[],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "node_id",
        summary: "The node's peer id, listen addresses (with /p2p/ suffix), agent version and protocols.",
        params: &[],
        result: r#"{"type":"object","properties":{"peer_id":{"type":"string"},"addresses":{"type":"array","items":{"type":"string"}}}}"#,
    },
    MethodDoc {
        name: "node_status",
        summary: "Uptime, peer counts, DHT size and mode, connection counters.",
        params: &[],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "swarm_peers",
        summary: "Connected peers with the addresses of their connections, their agent and the blocks received from each over bitswap.",
        params: &[],
        result: r#"{"type":"array","items":{"type":"object","properties":{"peer_id":{"type":"string"},"addresses":{"type":"array"},"agent_version":{"type":"string"},"blocks_received":{"type":"integer"}}}}"#,
    },
    MethodDoc {
        name: "swarm_connect",
        summary: "Dials a multiaddr and waits until connected; returns the peer id.",
        params: &[Param { name: "addr", schema: STRING, required: true, summary: "multiaddr, optionally ending in /p2p/<peer id>" }],
        result: r#"{"type":"object","properties":{"peer_id":{"type":"string"}}}"#,
    },
    MethodDoc {
        name: "content_add",
        summary: "Imports a file or directory from the node's file system (like `ipfs add`) and pins it. CIDs equal Kubo's.",
        params: &[
            Param { name: "path", schema: STRING, required: true, summary: "absolute path on the node's machine" },
            Param { name: "recursive", schema: BOOL, required: false, summary: "add a directory tree" },
            Param { name: "cid_version", schema: INT, required: false, summary: "0 (default, Qm...) or 1 (bafy..., raw leaves)" },
            Param { name: "hidden", schema: BOOL, required: false, summary: "include files whose name starts with '.'" },
            Param { name: "pin", schema: BOOL, required: false, summary: "pin the root (default true)" },
        ],
        result: r#"{"type":"object","properties":{"cid":{"type":"string"},"size":{"type":"integer"},"name":{"type":"string"}}}"#,
    },
    MethodDoc {
        name: "content_cat",
        summary: "A file's bytes, base64-encoded (at most 16 MiB; stream bigger files from the gateway, GET /ipfs/<cid>).",
        params: &[Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" }],
        result: r#"{"type":"object","properties":{"data_base64":{"type":"string"},"size":{"type":"integer"}}}"#,
    },
    MethodDoc {
        name: "content_get",
        summary: "Writes a file or directory tree to the node's file system, fetching missing blocks.",
        params: &[
            Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" },
            Param { name: "output", schema: STRING, required: true, summary: "where to write it" },
        ],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "content_stat",
        summary: "Type, size and cumulative DAG size of a CID or path.",
        params: &[Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" }],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "content_ls",
        summary: "Entries of a directory.",
        params: &[Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" }],
        result: r#"{"type":"array","items":{"type":"object"}}"#,
    },
    MethodDoc {
        name: "pin_add",
        summary: "Pins a CID: recursive (default) fetches and keeps the whole DAG, direct the one block.",
        params: &[
            Param { name: "cid", schema: STRING, required: true, summary: "the CID" },
            Param { name: "recursive", schema: BOOL, required: false, summary: "default true" },
        ],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "pin_rm",
        summary: "Removes a pin.",
        params: &[Param { name: "cid", schema: STRING, required: true, summary: "the CID" }],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc { name: "pin_ls", summary: "Every pin with its type.", params: &[], result: r#"{"type":"array"}"# },
    MethodDoc {
        name: "repo_gc",
        summary: "Deletes every block that no pin reaches.",
        params: &[],
        result: r#"{"type":"object","properties":{"removed":{"type":"integer"},"kept":{"type":"integer"}}}"#,
    },
    MethodDoc {
        name: "dag_export",
        summary: "Writes the DAG under a CID as a CAR v1 file on the node's file system (the gateway streams it: GET /ipfs/<cid>?format=car).",
        params: &[
            Param { name: "cid", schema: STRING, required: true, summary: "the root" },
            Param { name: "output", schema: STRING, required: true, summary: "path of the CAR file" },
        ],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "dag_import",
        summary: "Imports a CAR v1 file (every block verified) and pins its roots.",
        params: &[Param { name: "path", schema: STRING, required: true, summary: "path of the CAR file" }],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "core_delegationMessage",
        summary: "The SIWE (EIP-4361) text an owner signs to let a node key write to their core.",
        params: &[
            Param { name: "address", schema: STRING, required: true, summary: "the owner's Ethereum address (the core id)" },
            Param { name: "peer", schema: STRING, required: false, summary: "peer id to authorize (default: this node)" },
            Param { name: "namespaces", schema: STRING, required: false, summary: "comma-separated namespaces, or * (default)" },
            Param { name: "expires", schema: STRING, required: false, summary: "validity, e.g. 30d (default), 12h" },
        ],
        result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
    },
    MethodDoc {
        name: "core_revocationMessage",
        summary: "The text an owner signs to revoke a node key (the key's changes made so far stay).",
        params: &[
            Param { name: "address", schema: STRING, required: true, summary: "the core" },
            Param { name: "peer", schema: STRING, required: true, summary: "peer id to revoke" },
        ],
        result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
    },
    MethodDoc {
        name: "core_submit",
        summary: "Verifies an owner-signed delegation (for this node) or revocation and applies it.",
        params: &[
            Param { name: "message", schema: STRING, required: true, summary: "the signed text, exactly" },
            Param { name: "signature", schema: STRING, required: true, summary: "0x-hex EIP-191 signature (65 bytes)" },
        ],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "core_follow",
        summary: "Holds a replica of a core without write rights.",
        params: &[Param { name: "address", schema: STRING, required: true, summary: "the core" }],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "core_set",
        summary: "Writes a JSON value at namespace/path; returns once the change is on disk.",
        params: &[
            Param { name: "address", schema: STRING, required: true, summary: "the core" },
            Param { name: "namespace", schema: STRING, required: true, summary: "top-level namespace" },
            Param { name: "path", schema: STRING, required: true, summary: "a/b/c inside the namespace" },
            Param { name: "value", schema: r#"{}"#, required: true, summary: "any JSON value" },
        ],
        result: r#"{"type":"object"}"#,
    },
    MethodDoc {
        name: "core_get",
        summary: "Reads the JSON value at namespace/path (the whole namespace without path).",
        params: &[
            Param { name: "address", schema: STRING, required: true, summary: "the core" },
            Param { name: "namespace", schema: STRING, required: true, summary: "top-level namespace" },
            Param { name: "path", schema: STRING, required: false, summary: "a/b/c inside the namespace" },
        ],
        result: r#"{}"#,
    },
    MethodDoc { name: "core_ls", summary: "Cores held, with heads, change counts and replica counts.", params: &[], result: r#"{"type":"array"}"# },
    MethodDoc {
        name: "core_heads",
        summary: "The heads of a core.",
        params: &[Param { name: "address", schema: STRING, required: true, summary: "the core" }],
        result: r#"{"type":"array","items":{"type":"string"}}"#,
    },
    MethodDoc {
        name: "dht_routingTable",
        summary: "Peers in the Kademlia routing table.",
        params: &[],
        result: r#"{"type":"array","items":{"type":"object"}}"#,
    },
];

/// How long `swarm_connect` waits for a dial.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs one method.
pub async fn dispatch(state: &ApiState, method: &str, params: Value) -> Result<Value, RpcError> {
    let Some(doc) = all_methods().find(|m| m.name == method) else {
        return Err(RpcError::new(code::METHOD_NOT_FOUND, format!("method not found: {method}")));
    };
    let params = named_params(doc, params)?;
    let client = &state.client;
    match method {
        "rpc.discover" => Ok(openrpc_document()),
        "node_id" => to_value(client.info().await.map_err(RpcError::node)?),
        "node_status" => to_value(client.status().await.map_err(RpcError::node)?),
        "swarm_peers" => to_value(client.net().peers().await.map_err(RpcError::node)?),
        "dht_routingTable" => to_value(client.net().routing_table().await.map_err(RpcError::node)?),
        "swarm_connect" => {
            let addr: libp2p::Multiaddr = parse_param(&params, "addr")?;
            let peer = tokio::time::timeout(CONNECT_TIMEOUT, client.net().connect(addr.clone()))
                .await
                .map_err(|_| RpcError::node(format!("connecting to {addr} timed out after {CONNECT_TIMEOUT:?}")))?
                .map_err(RpcError::node)?;
            Ok(json!({ "peer_id": peer.to_base58() }))
        }
        "content_add" | "content_cat" | "content_get" | "content_stat" | "content_ls" | "pin_add" | "pin_rm"
        | "pin_ls" | "repo_gc" | "dag_export" | "dag_import" => super::content::dispatch(state, method, params).await,
        "core_follow" | "core_submit" | "core_set" | "core_get" | "core_ls" | "core_heads" | "core_delegationMessage"
        | "core_revocationMessage" => super::core::dispatch(state, method, params).await,
        m if m.starts_with("msg_") => super::msg::dispatch(state, method, params).await,
        _ => Err(RpcError::new(code::INTERNAL_ERROR, format!("method {method} is described but not implemented"))),
    }
}

/// Every method: the table above and each domain's own.
pub fn all_methods() -> impl Iterator<Item = &'static MethodDoc> {
    METHODS.iter().chain(super::msg::METHODS)
}

pub(super) fn to_value(value: impl serde::Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::new(code::INTERNAL_ERROR, e.to_string()))
}

/// Turns positional params into named ones and checks required and unknown names.
fn named_params(doc: &MethodDoc, params: Value) -> Result<Map<String, Value>, RpcError> {
    let named = match params {
        Value::Null => Map::new(),
        Value::Object(map) => map,
        Value::Array(values) => {
            if values.len() > doc.params.len() {
                return Err(RpcError::invalid_params(format!(
                    "{} takes at most {} params, got {}",
                    doc.name,
                    doc.params.len(),
                    values.len()
                )));
            }
            doc.params.iter().map(|p| p.name.to_string()).zip(values).collect()
        }
        _ => return Err(RpcError::invalid_params("params must be an object or an array")),
    };
    for key in named.keys() {
        if !doc.params.iter().any(|p| p.name == key) {
            return Err(RpcError::invalid_params(format!("{} has no param named '{key}'", doc.name)));
        }
    }
    for param in doc.params.iter().filter(|p| p.required) {
        if !named.contains_key(param.name) {
            return Err(RpcError::invalid_params(format!("missing param '{}'", param.name)));
        }
    }
    Ok(named)
}

/// Reads a param given as a string and parses it (multiaddr, CID, address...).
pub fn parse_param<T>(params: &Map<String, Value>, name: &str) -> Result<T, RpcError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = params
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params(format!("param '{name}' must be a string")))?;
    text.parse().map_err(|e| RpcError::invalid_params(format!("invalid {name} '{text}': {e}")))
}

/// The OpenRPC 1.2 document of this API.
pub fn openrpc_document() -> Value {
    let methods: Vec<Value> = all_methods()
        .map(|m| {
            let params: Vec<Value> = m
                .params
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "summary": p.summary,
                        "required": p.required,
                        "schema": serde_json::from_str::<Value>(p.schema).unwrap_or(Value::Null),
                    })
                })
                .collect();
            json!({
                "name": m.name,
                "summary": m.summary,
                "paramStructure": "either",
                "params": params,
                "result": { "name": "result", "schema": serde_json::from_str::<Value>(m.result).unwrap_or(Value::Null) },
            })
        })
        .collect();
    json!({
        "openrpc": "1.2.6",
        "info": {
            "title": "Kubelt node API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Admin API of a kubelt node. Every call needs 'Authorization: Bearer <secret from <repo>/api.cookie>'.",
        },
        "methods": methods,
        "components": {
            "errors": super::code::ALL.iter().map(|(code, message)| (code.to_string(), json!({ "code": code, "message": message }))).collect::<serde_json::Map<String, Value>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_in_the_table_is_valid_json() {
        for m in all_methods() {
            assert!(serde_json::from_str::<Value>(m.result).is_ok(), "{}", m.name);
            for p in m.params {
                assert!(serde_json::from_str::<Value>(p.schema).is_ok(), "{}.{}", m.name, p.name);
            }
        }
    }

    #[test]
    fn positional_params_are_named_and_unknown_ones_refused() {
        let doc = METHODS.iter().find(|m| m.name == "swarm_connect").unwrap();
        let named = named_params(doc, json!(["/ip4/127.0.0.1/tcp/1"])).unwrap();
        assert_eq!(named["addr"], "/ip4/127.0.0.1/tcp/1");
        assert_eq!(named_params(doc, json!({"adr": "x"})).unwrap_err().code, code::INVALID_PARAMS);
        assert_eq!(named_params(doc, json!({})).unwrap_err().code, code::INVALID_PARAMS);
    }
}
