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
        summary: "Connected peers with the addresses of their connections.",
        params: &[],
        result: r#"{"type":"array","items":{"type":"object","properties":{"peer_id":{"type":"string"},"addresses":{"type":"array"}}}}"#,
    },
    MethodDoc {
        name: "swarm_connect",
        summary: "Dials a multiaddr and waits until connected; returns the peer id.",
        params: &[Param { name: "addr", schema: STRING, required: true, summary: "multiaddr, optionally ending in /p2p/<peer id>" }],
        result: r#"{"type":"object","properties":{"peer_id":{"type":"string"}}}"#,
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
    let Some(doc) = METHODS.iter().find(|m| m.name == method) else {
        return Err(RpcError::new(code::METHOD_NOT_FOUND, format!("method not found: {method}")));
    };
    let params = named_params(doc, params)?;
    let client = &state.client;
    match method {
        "rpc.discover" => Ok(openrpc_document()),
        "node_id" => to_value(client.info().await.map_err(RpcError::node)?),
        "node_status" => to_value(client.status().await.map_err(RpcError::node)?),
        "swarm_peers" => to_value(client.peers().await.map_err(RpcError::node)?),
        "dht_routingTable" => to_value(client.routing_table().await.map_err(RpcError::node)?),
        "swarm_connect" => {
            let addr: libp2p::Multiaddr = parse_param(&params, "addr")?;
            let peer = tokio::time::timeout(CONNECT_TIMEOUT, client.connect(addr.clone()))
                .await
                .map_err(|_| RpcError::node(format!("connecting to {addr} timed out after {CONNECT_TIMEOUT:?}")))?
                .map_err(RpcError::node)?;
            Ok(json!({ "peer_id": peer.to_base58() }))
        }
        _ => Err(RpcError::new(code::INTERNAL_ERROR, format!("method {method} is described but not implemented"))),
    }
}

fn to_value(value: impl serde::Serialize) -> Result<Value, RpcError> {
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
    let methods: Vec<Value> = METHODS
        .iter()
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_in_the_table_is_valid_json() {
        for m in METHODS {
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
