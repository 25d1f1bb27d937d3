//! `config.toml`: the node's settings. Every key has a default; `kubelt init` writes them all
//! out with a comment each. Unknown keys are refused so that a typo never goes unnoticed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use kubelt_protocol::{node, swarm};

/// Default TCP and UDP (QUIC) port of the swarm.
pub const DEFAULT_SWARM_PORT: u16 = 4420;
/// Default address of the JSON-RPC admin API and `/metrics`.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:5420";
/// Default address of the gateway: its own port, so never the API's origin. Not Kubo's 8080,
/// which a Kubo or a web server on the same machine would already hold; 5421 is kept for the
/// app API (DESIGN.md).
pub const DEFAULT_GATEWAY_ADDR: &str = "127.0.0.1:5422";

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub network: NetworkConfig,
    pub content: ContentConfig,
    pub api: ApiConfig,
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContentConfig {
    pub fetch_timeout_secs: u64,
}

impl Default for ContentConfig {
    fn default() -> Self {
        ContentConfig { fetch_timeout_secs: 60 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    pub bootstrap: bool,
    pub dht_mode: swarm::DhtMode,
    pub target_peers: usize,
    pub max_connections: u32,
    pub idle_connection_timeout_secs: u64,
    pub bootstrap_interval_secs: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let defaults = swarm::Config::default();
        NetworkConfig {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_SWARM_PORT}").parse().expect("valid literal multiaddr"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_SWARM_PORT}/quic-v1").parse().expect("valid literal multiaddr"),
            ],
            peers: vec![],
            bootstrap: false,
            dht_mode: defaults.dht_mode,
            target_peers: node::Config::default().target_peers,
            max_connections: defaults.max_connections,
            idle_connection_timeout_secs: defaults.idle_connection_timeout.as_secs(),
            bootstrap_interval_secs: defaults.bootstrap_interval.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Host names, besides localhost, 127.0.0.1, [::1] and the listen address, that requests
    /// to the API may carry in `Host` (e.g. the name of a reverse proxy in front of it).
    pub allowed_hosts: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: DEFAULT_API_ADDR.parse().expect("valid literal socket address"), allowed_hosts: vec![] }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig { listen: DEFAULT_GATEWAY_ADDR.parse().expect("valid literal socket address") }
    }
}

impl Config {
    /// Reads and checks `config.toml`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid configuration in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        if config.network.bootstrap && config.network.dht_mode == swarm::DhtMode::Client {
            anyhow::bail!("network.bootstrap = true needs network.dht_mode = \"server\"");
        }
        if let Some(bad) = config.api.allowed_hosts.iter().find(|h| !is_host_name(h)) {
            anyhow::bail!("api.allowed_hosts: {bad:?} is not a host name (write just the name, like \"kubelt.lan\", without scheme, port or path)");
        }
        Ok(config)
    }

    /// The node settings this configuration describes.
    pub fn node_config(&self) -> node::Config {
        let net = &self.network;
        let mut swarm = if net.bootstrap { swarm::Config::bootstrap() } else { swarm::Config::default() };
        swarm.dht_mode = if net.bootstrap { swarm::DhtMode::Server } else { net.dht_mode };
        if !net.bootstrap {
            swarm.max_connections = net.max_connections;
        } else {
            swarm.max_connections = swarm.max_connections.max(net.max_connections);
        }
        swarm.idle_connection_timeout = Duration::from_secs(net.idle_connection_timeout_secs);
        swarm.bootstrap_interval = Duration::from_secs(net.bootstrap_interval_secs.max(1));
        swarm.bitswap = swarm.bitswap.with_want_timeout(Duration::from_secs(self.content.fetch_timeout_secs.max(1)));
        node::Config {
            listen: net.listen.clone(),
            bootstrap_peers: net.peers.clone(),
            target_peers: net.target_peers,
            swarm,
            ..node::Config::default()
        }
    }

    /// The commented `config.toml` that `kubelt init` writes: every key with its default.
    pub fn commented_template() -> String {
        let d = Config::default();
        let list = |v: &[Multiaddr]| v.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
        format!(
            r#"# Kubelt node configuration. Every key is written out with its default value.
# Command-line flags (`kubelt run --help`) override what is set here.

[network]
# Multiaddrs to listen on: TCP and QUIC by default, on every interface.
listen = [{listen}]
# Bootstrap peers to join the network through, e.g. "/ip4/192.0.2.1/tcp/4420/p2p/12D3Koo...".
# None by default: the node runs on its own until you add one (or pass --peer).
peers = []
# Bootstrap mode: DHT server with higher connection limits, for community bootstrap peers.
bootstrap = {bootstrap}
# "server" answers DHT queries (reachable nodes); "client" only asks (nodes behind NAT).
dht_mode = "{dht_mode}"
# The node dials peers it knows until it has this many connections.
target_peers = {target_peers}
# Most connections in total (bootstrap mode raises it to at least 2048).
max_connections = {max_connections}
# Seconds a connection with no open streams stays up.
idle_connection_timeout_secs = {idle}
# Seconds between Kademlia bootstrap rounds that refresh the routing table.
bootstrap_interval_secs = {bootstrap_interval}

[content]
# Seconds a wanted block may take to arrive (from any peer, including providers found in the
# DHT) before `cat`, `get`, `pin add` or the gateway give up with an error.
fetch_timeout_secs = {fetch_timeout}

[api]
# HOST:PORT of the JSON-RPC admin API (HTTP POST / and WebSocket GET /) and /metrics. Keep it
# on loopback: calls are guarded by the secret in <repo>/api.cookie, /metrics is open.
listen = "{api}"
# The API answers only requests whose Host is localhost, 127.0.0.1, [::1] or the listen
# address (with any port), so that no web page reaches it through DNS rebinding. Add the
# names you reach it under otherwise, e.g. ["kubelt.lan"].
allowed_hosts = []

[gateway]
# HOST:PORT of the read-only gateway (GET /ipfs/<cid>[/path]), open to anyone who can reach
# it. Its own port: what it serves is anyone's HTML, which must never share the API's origin.
listen = "{gateway}"
"#,
            listen = list(&d.network.listen),
            bootstrap = d.network.bootstrap,
            dht_mode = match d.network.dht_mode {
                swarm::DhtMode::Server => "server",
                swarm::DhtMode::Client => "client",
            },
            target_peers = d.network.target_peers,
            max_connections = d.network.max_connections,
            idle = d.network.idle_connection_timeout_secs,
            bootstrap_interval = d.network.bootstrap_interval_secs,
            api = d.api.listen,
            gateway = d.gateway.listen,
            fetch_timeout = d.content.fetch_timeout_secs,
        )
    }
}

/// Whether `name` is a bare host name or IP address, as `Host` carries it (IPv6 in brackets).
fn is_host_name(name: &str) -> bool {
    let bracketed_v6 = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    let dns = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    bracketed_v6 || dns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commented_template_parses_to_the_defaults() {
        assert_eq!(Config::parse(&Config::commented_template()).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Config::parse("[network]\nlisten_on = []\n").unwrap_err();
        assert!(format!("{err:#}").contains("listen_on"), "{err:#}");
    }

    #[test]
    fn allowed_hosts_must_be_bare_names() {
        let config = Config::parse("[api]\nallowed_hosts = [\"kubelt.lan\", \"[::2]\", \"10.0.0.1\"]\n").unwrap();
        assert_eq!(config.api.allowed_hosts.len(), 3);
        for bad in ["http://kubelt.lan", "kubelt.lan:5420", "", "a/b"] {
            let err = Config::parse(&format!("[api]\nallowed_hosts = [{bad:?}]\n")).unwrap_err();
            assert!(format!("{err:#}").contains("allowed_hosts"), "{err:#}");
        }
    }

    #[test]
    fn malformed_multiaddr_is_refused() {
        let err = Config::parse("[network]\npeers = [\"/ip4/not-an-ip/tcp/1\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("peers"), "{err:#}");
    }
}
