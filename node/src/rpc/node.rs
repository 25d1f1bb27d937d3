//! The node's own methods: who it is, its status, its peers and DHT, dialing; and
//! `rpc.discover`.

use serde_json::{json, Value};

use super::registry::{parse_param, to_value, Auth, Ctx, Kind, Method, Namespace, Param, Params};
use super::RpcError;

const STRING: &str = r#"{"type":"string"}"#;

pub static NAMESPACE: Namespace = Namespace {
    name: "node",
    summary: "The node itself: identity, status, peers, DHT; and this document.",
    methods: &[
        Method {
            name: "rpc.discover",
            summary: "This API's OpenRPC document.",
            params: &[],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { Ok(ctx.registry.openrpc()) }),
        },
        Method {
            name: "node_id",
            summary: "The node's peer id, listen addresses (with /p2p/ suffix), agent version and protocols.",
            params: &[],
            result: r#"{"type":"object","properties":{"peer_id":{"type":"string"},"addresses":{"type":"array","items":{"type":"string"}}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { to_value(ctx.state.client.info().await.map_err(RpcError::node)?) }),
        },
        Method {
            name: "node_status",
            summary: "Uptime, peer counts, DHT size and mode, connection counters.",
            params: &[],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { to_value(ctx.state.client.status().await.map_err(RpcError::node)?) }),
        },
        Method {
            name: "swarm_peers",
            summary: "Connected peers with the addresses of their connections, their agent and the blocks received from each over bitswap.",
            params: &[],
            result: r#"{"type":"array","items":{"type":"object","properties":{"peer_id":{"type":"string"},"addresses":{"type":"array"},"agent_version":{"type":"string"},"blocks_received":{"type":"integer"}}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { to_value(ctx.state.client.net().peers().await.map_err(RpcError::node)?) }),
        },
        Method {
            name: "swarm_connect",
            summary: "Dials a multiaddr and waits until connected; returns the peer id.",
            params: &[Param { name: "addr", schema: STRING, required: true, summary: "multiaddr, optionally ending in /p2p/<peer id>" }],
            result: r#"{"type":"object","properties":{"peer_id":{"type":"string"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(swarm_connect(ctx, p)),
        },
        Method {
            name: "dht_routingTable",
            summary: "Peers in the Kademlia routing table.",
            params: &[],
            result: r#"{"type":"array","items":{"type":"object"}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { to_value(ctx.state.client.net().routing_table().await.map_err(RpcError::node)?) }),
        },
    ],
};

/// How long `swarm_connect` waits for a dial.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn swarm_connect(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let addr: libp2p::Multiaddr = parse_param(&p, "addr")?;
    let peer = tokio::time::timeout(CONNECT_TIMEOUT, ctx.state.client.net().connect(addr.clone()))
        .await
        .map_err(|_| RpcError::node(format!("connecting to {addr} timed out after {CONNECT_TIMEOUT:?}")))?
        .map_err(RpcError::node)?;
    Ok(json!({ "peer_id": peer.to_base58() }))
}
