//! `GET /metrics`: the node's counters in the Prometheus text format (prometheus-client),
//! read from the node at scrape time. No secret is needed, so that a scraper needs no setup,
//! but the labels name every core (wallet address) the node holds: it is served on the admin
//! API's listener, behind the same `Host` check, never on the gateway's.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use std::sync::atomic::Ordering::Relaxed;

use crate::rpc::ApiState;

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric = Gauge::<i64>::default();
    metric.set(value as i64);
    registry.register(name, help, metric);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric = Counter::<u64>::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}

pub async fn metrics(State(state): State<ApiState>) -> Response {
    // Per-core figures for the cores in memory only: a hosted node holds thousands, and a
    // scrape must not load them all.
    let (Ok(status), Ok(holding), Ok(cores)) =
        (state.client.status().await, state.client.cores().holding(None).await, state.client.cores().list_loaded().await)
    else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the node has stopped\n").into_response();
    };
    let mut registry = Registry::with_prefix("kubelt");
    gauge(&mut registry, "uptime_seconds", "Seconds since the node started", status.uptime_secs);
    gauge(&mut registry, "connected_peers", "Peers with an open connection", status.connected_peers as u64);
    gauge(&mut registry, "routing_table_peers", "Peers in the Kademlia routing table", status.routing_table_peers as u64);
    gauge(&mut registry, "known_peers", "Peers remembered in the database", status.known_peers as u64);
    counter(&mut registry, "connections_established", "Connections opened", status.connections_established);
    counter(&mut registry, "connections_closed", "Connections closed", status.connections_closed);
    counter(&mut registry, "dht_bootstraps", "Kademlia bootstrap rounds completed", status.bootstraps_completed);
    let bitswap = &status.bitswap;
    counter(&mut registry, "bitswap_blocks_sent", "Blocks sent over bitswap", bitswap.blocks_sent);
    counter(&mut registry, "bitswap_sent_bytes", "Block bytes sent over bitswap", bitswap.bytes_sent);
    counter(&mut registry, "bitswap_blocks_received", "Wanted blocks received, verified and stored", bitswap.blocks_received);
    counter(&mut registry, "bitswap_received_bytes", "Block bytes received", bitswap.bytes_received);
    counter(&mut registry, "bitswap_duplicate_blocks", "Blocks received that were already stored", bitswap.duplicate_blocks);
    gauge(&mut registry, "bitswap_wantlist_size", "Blocks this node wants now", bitswap.wantlist_size as u64);
    gauge(&mut registry, "cores_held", "Cores this node replicates", holding.held as u64);
    gauge(&mut registry, "cores_loaded", "Cores whose replicas are in memory now", holding.loaded as u64);
    counter(&mut registry, "core_loads", "Replicas loaded from the store on demand", holding.loads);
    counter(&mut registry, "core_unloads", "Replicas unloaded (least recently used) to stay within the limits", holding.unloads);
    let changes = Family::<Vec<(String, String)>, Gauge>::default();
    let replicas = Family::<Vec<(String, String)>, Gauge>::default();
    for core in &cores {
        let labels = vec![("core".to_string(), core.address.clone())];
        changes.get_or_create(&labels).set(core.changes as i64);
        replicas.get_or_create(&labels).set(core.replicas as i64);
    }
    let websockets = &state.websockets;
    gauge(&mut registry, "api_websocket_connections", "WebSocket connections to the API open now", websockets.open() as u64);
    gauge(&mut registry, "api_websocket_subscriptions", "Subscriptions held by WebSocket connections", websockets.subscriptions.load(Relaxed) as u64);
    counter(&mut registry, "api_websocket_closed_too_slow", "WebSocket connections closed because the client did not read", websockets.closed_too_slow.load(Relaxed));
    registry.register("core_changes", "Changes in a core's document", changes);
    registry.register("core_replicas_online", "Peers online that hold the core", replicas);
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
