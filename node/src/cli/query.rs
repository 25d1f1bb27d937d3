//! Commands that ask the running node through its API: `id`, `swarm peers`, `swarm connect`,
//! `status`.

use libp2p::Multiaddr;
use serde_json::{json, Value};

use crate::api_client::ApiClient;
use crate::repo::Repo;

/// Prints a JSON value for `--json` output.
pub(super) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

pub fn id(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let info = ApiClient::for_repo(repo)?.call("node_id", Value::Null)?;
    if json {
        return print_json(&info);
    }
    println!("peer id: {}", info["peer_id"].as_str().unwrap_or("?"));
    println!("agent:   {}", info["agent_version"].as_str().unwrap_or("?"));
    println!("addresses:");
    for addr in strings(&info["addresses"]) {
        println!("  {addr}");
    }
    Ok(())
}

pub fn swarm_peers(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let peers = ApiClient::for_repo(repo)?.call("swarm_peers", Value::Null)?;
    if json {
        return print_json(&peers);
    }
    let list = peers.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no connected peers");
    }
    for peer in list {
        let agent = peer["agent_version"].as_str().unwrap_or("");
        let relayed = if peer["relayed"].as_bool() == Some(true) { " (relayed only: no content until a direct connection)" } else { "" };
        println!("{} {}{relayed}", peer["peer_id"].as_str().unwrap_or("?"), agent);
        for addr in strings(&peer["addresses"]) {
            let kind = if addr.contains("/p2p-circuit") { "relayed" } else { "direct" };
            println!("  {addr} [{kind}]");
        }
    }
    Ok(())
}

pub fn swarm_connect(repo: &Repo, addr: Multiaddr, json: bool) -> anyhow::Result<()> {
    let result = ApiClient::for_repo(repo)?.call("swarm_connect", json!({ "addr": addr.to_string() }))?;
    if json {
        return print_json(&result);
    }
    println!("connected to {}", result["peer_id"].as_str().unwrap_or("?"));
    Ok(())
}

pub fn status(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let status = ApiClient::for_repo(repo)?.call("node_status", Value::Null)?;
    if json {
        return print_json(&status);
    }
    let field = |name: &str| status.get(name).map(|v| v.to_string().trim_matches('"').to_string()).unwrap_or_default();
    println!("peer id:          {}", field("peer_id"));
    println!("agent:            {}", field("agent_version"));
    println!("uptime:           {}s", field("uptime_secs"));
    println!("connected peers:  {}", field("connected_peers"));
    println!("routing table:    {} peers (DHT {})", field("routing_table_peers"), field("dht_mode"));
    println!("reachability:     {}", field("reachability"));
    let list = |name: &str| {
        let addrs = strings(&status[name]);
        if addrs.is_empty() { "none".to_string() } else { addrs.join("\n                  ") }
    };
    println!("external addrs:   {}", list("external_addresses"));
    println!("relay addrs:      {}", list("relay_addresses"));
    if let Some(error) = status["relay_error"].as_str() {
        println!("relay error:      {error}");
    }
    if let Some(relay) = status.get("relay_server").filter(|r| r.is_object()) {
        println!(
            "relay server:     {} reservations, {} circuits ({} reservations and {} circuits refused; {} circuits ended at the byte limit, {} at the time limit)",
            relay["reservations"],
            relay["circuits"],
            relay["reservations_denied"],
            relay["circuits_denied"],
            relay["circuits_closed_at_byte_limit"],
            relay["circuits_closed_at_time_limit"]
        );
    }
    if let Some(cut) = status["last_relay_cut"].as_str() {
        println!("relayed cut:      {} since start; last: {cut}", field("relayed_connections_cut"));
    }
    println!("hole punching:    {} direct, {} failed", field("hole_punches_succeeded"), field("hole_punches_failed"));
    println!("known peers:      {}", field("known_peers"));
    println!("bootstraps done:  {} ({} timed out)", field("bootstraps_completed"), field("bootstraps_failed"));
    println!("connections:      {} opened, {} closed", field("connections_established"), field("connections_closed"));
    Ok(())
}
