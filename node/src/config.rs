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
/// Default address of the app API (`kb_*`, issue 12).
pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:5421";

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub network: NetworkConfig,
    pub content: ContentConfig,
    pub api: ApiConfig,
    pub gateway: GatewayConfig,
    pub app: AppConfig,
    pub cores: CoresConfig,
}

/// How many core replicas stay in memory: the others are loaded from the store when used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CoresConfig {
    /// Replicas kept in memory at once.
    pub max_loaded: usize,
    /// Estimated MiB of the replicas kept in memory at once.
    pub max_loaded_mib: usize,
}

impl Default for CoresConfig {
    fn default() -> Self {
        let d = kubelt_protocol::core::Config::default();
        CoresConfig { max_loaded: d.max_loaded_cores, max_loaded_mib: d.max_loaded_bytes >> 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    pub listen: SocketAddr,
    /// Origins CORS answers (`https://notes.example`); empty: any origin.
    pub cors_origins: Vec<String>,
    /// Wallets (0x addresses) that may sign in on a personal node.
    pub owners: Vec<String>,
    /// Any wallet may sign in and have its core here, under the quotas.
    pub hosted: bool,
    pub quotas: crate::rpc::app::Quotas,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            listen: DEFAULT_APP_ADDR.parse().expect("valid literal socket address"),
            cors_origins: vec![],
            owners: vec![],
            hosted: false,
            quotas: Default::default(),
        }
    }
}

impl AppConfig {
    /// The app API's settings; fails on an owner that is not an address.
    pub fn settings(&self) -> anyhow::Result<crate::rpc::app::AppSettings> {
        let owners = self
            .owners
            .iter()
            .map(|o| kubelt_protocol::core::Address::parse(o).map_err(|e| anyhow::anyhow!("app.owners: {o:?} is not an address: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(crate::rpc::app::AppSettings { owners, hosted: self.hosted, cors_origins: self.cors_origins.clone(), quotas: self.quotas.clone() })
    }
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
    /// Seconds between AutoNAT probes while the verdict is unsure (ten times that once sure).
    pub autonat_interval_secs: u64,
    /// Let AutoNAT vouch for private and loopback addresses (LANs, test networks).
    pub autonat_private_addresses: bool,
    /// Serve as a circuit relay (bootstrap nodes always do).
    pub relay: bool,
    pub relay_max_reservations: usize,
    pub relay_max_reservations_per_peer: usize,
    pub relay_max_circuits: usize,
    pub relay_max_circuits_per_peer: usize,
    pub relay_circuit_duration_secs: u64,
    pub relay_circuit_bytes: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let defaults = swarm::Config::default();
        let relay = kubelt_protocol::nat::RelayLimits::default();
        NetworkConfig {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_SWARM_PORT}").parse().expect("valid literal multiaddr"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_SWARM_PORT}/quic-v1").parse().expect("valid literal multiaddr"),
            ],
            peers: vec![],
            bootstrap: false,
            // The library's default is `server` (in-process nodes); a node a person runs follows
            // AutoNAT.
            dht_mode: swarm::DhtMode::Auto,
            target_peers: node::Config::default().target_peers,
            max_connections: defaults.max_connections,
            idle_connection_timeout_secs: defaults.idle_connection_timeout.as_secs(),
            bootstrap_interval_secs: defaults.bootstrap_interval.as_secs(),
            autonat_interval_secs: defaults.nat.autonat_interval.as_secs(),
            autonat_private_addresses: defaults.nat.autonat_private_addresses,
            relay: false,
            relay_max_reservations: relay.max_reservations,
            relay_max_reservations_per_peer: relay.max_reservations_per_peer,
            relay_max_circuits: relay.max_circuits,
            relay_max_circuits_per_peer: relay.max_circuits_per_peer,
            relay_circuit_duration_secs: relay.max_circuit_duration.as_secs(),
            relay_circuit_bytes: relay.max_circuit_bytes,
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
        let net = &config.network;
        if (net.bootstrap || net.relay) && (net.relay_max_reservations == 0 || net.relay_max_circuits == 0) {
            anyhow::bail!("network.relay_max_reservations and network.relay_max_circuits must be at least 1 on a relay (or set network.relay = false)");
        }
        if let Some(bad) = config.api.allowed_hosts.iter().find(|h| !is_host_name(h)) {
            anyhow::bail!("api.allowed_hosts: {bad:?} is not a host name (write just the name, like \"kubelt.lan\", without scheme, port or path)");
        }
        config.app.settings()?;
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
        swarm.nat = kubelt_protocol::nat::Config {
            autonat: true,
            autonat_interval: Duration::from_secs(net.autonat_interval_secs.max(1)),
            autonat_private_addresses: net.autonat_private_addresses,
            relay_server: (net.bootstrap || net.relay).then(|| kubelt_protocol::nat::RelayLimits {
                max_reservations: net.relay_max_reservations,
                max_reservations_per_peer: net.relay_max_reservations_per_peer.max(1),
                max_circuits: net.relay_max_circuits,
                max_circuits_per_peer: net.relay_max_circuits_per_peer.max(1),
                max_circuit_duration: Duration::from_secs(net.relay_circuit_duration_secs.max(1)),
                max_circuit_bytes: net.relay_circuit_bytes,
                ..kubelt_protocol::nat::RelayLimits::default()
            }),
        };
        swarm.bitswap = swarm.bitswap.with_want_timeout(Duration::from_secs(self.content.fetch_timeout_secs.max(1)));
        let mut cores = kubelt_protocol::core::Config::default();
        cores.max_loaded_cores = self.cores.max_loaded.max(1);
        cores.max_loaded_bytes = self.cores.max_loaded_mib.max(1) << 20;
        node::Config {
            listen: net.listen.clone(),
            bootstrap_peers: net.peers.clone(),
            target_peers: net.target_peers,
            swarm,
            cores,
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
# Bootstrap mode: DHT server with higher connection limits and a relay, for community
# bootstrap peers.
bootstrap = {bootstrap}
# "auto" follows AutoNAT: DHT server while others can dial this node, client while it is behind
# a NAT ("private"). "server" always answers DHT queries; "client" only asks.
dht_mode = "{dht_mode}"
# The node dials peers it knows until it has this many connections, and keeps this many open
# although idle (replicas of the cores it holds count, and are always kept); it also keeps the
# peers that dialed it, up to three times this many connections kept in all.
target_peers = {target_peers}
# Most connections in total (bootstrap mode raises it to at least 2048).
max_connections = {max_connections}
# Seconds an idle connection stays up when the node does not keep it (peers met through DHT
# queries, mostly): no request or transfer open, no core shared, not kept for target_peers.
idle_connection_timeout_secs = {idle}
# Seconds between Kademlia bootstrap rounds that refresh the routing table.
bootstrap_interval_secs = {bootstrap_interval}
# Seconds between AutoNAT probes (peers dialing this node back) while the verdict is unsure;
# ten times that once it is sure. `kubelt status` shows the verdict: public, private, unknown.
autonat_interval_secs = {autonat_interval}
# Let AutoNAT vouch for private and loopback addresses. Only for LANs and test networks: on
# the internet, a peer on your own LAN would call a node behind NAT public.
autonat_private_addresses = {autonat_private}
# Serve as a circuit relay for nodes behind NAT (bootstrap nodes always do): they meet here and
# then connect directly (hole punching). A relay carries core changes and DHT traffic within
# the limits below, never content.
relay = {relay}
# Reservations (nodes reachable through this relay) held at once, and per node.
relay_max_reservations = {relay_res}
relay_max_reservations_per_peer = {relay_res_peer}
# Relayed connections open at once, and per node.
relay_max_circuits = {relay_circ}
relay_max_circuits_per_peer = {relay_circ_peer}
# Seconds and bytes one relayed connection may use before the relay closes it.
relay_circuit_duration_secs = {relay_secs}
relay_circuit_bytes = {relay_bytes}

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

[app]
# HOST:PORT of the app API: web apps sign in with a wallet (kb_getNonce/kb_verifyNonce) and use
# the person's core (kb_getData, kb_setData, kb_subscribe). The admin cookie does not work here.
listen = "{app}"
# Origins answered by CORS, e.g. ["https://notes.example"]; empty: any origin (tokens are
# bearer tokens, not cookies).
cors_origins = []
# Wallets that may sign in on this personal node, e.g. ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"].
owners = []
# true: any wallet may sign in and have its core on this node, under the quotas below.
hosted = false

[app.quotas]
# Cores a hosted node holds for wallets that sign in.
cores = {q_cores}
# Calls per minute per core.
requests_per_minute = {q_rpm}
# Open WebSocket connections per token.
websockets_per_token = {q_ws}
# Logins (kb_getNonce) per minute per client IP address.
logins_per_minute_per_ip = {q_logins}
# Bytes a core may hold on this node through the app API: its document (every change) plus the
# objects stored with kb_putObject. A write past it is refused (-32046).
bytes_per_core = {q_bytes}
# Largest app API request in bytes (at most 2 MiB, the hard limit); larger ones are refused
# (-32045).
max_request_bytes = {q_request}

[cores]
# Core replicas kept in memory; the others are loaded from the store when used and the least
# recently used are unloaded (a hosted node holds many more cores than it uses at once).
max_loaded = {max_loaded}
# Estimated MiB of the replicas kept in memory.
max_loaded_mib = {max_loaded_mib}
"#,
            listen = list(&d.network.listen),
            bootstrap = d.network.bootstrap,
            dht_mode = match d.network.dht_mode {
                swarm::DhtMode::Server => "server",
                swarm::DhtMode::Client => "client",
                swarm::DhtMode::Auto => "auto",
            },
            target_peers = d.network.target_peers,
            max_connections = d.network.max_connections,
            idle = d.network.idle_connection_timeout_secs,
            bootstrap_interval = d.network.bootstrap_interval_secs,
            autonat_interval = d.network.autonat_interval_secs,
            autonat_private = d.network.autonat_private_addresses,
            relay = d.network.relay,
            relay_res = d.network.relay_max_reservations,
            relay_res_peer = d.network.relay_max_reservations_per_peer,
            relay_circ = d.network.relay_max_circuits,
            relay_circ_peer = d.network.relay_max_circuits_per_peer,
            relay_secs = d.network.relay_circuit_duration_secs,
            relay_bytes = d.network.relay_circuit_bytes,
            api = d.api.listen,
            gateway = d.gateway.listen,
            app = d.app.listen,
            q_cores = d.app.quotas.cores,
            q_rpm = d.app.quotas.requests_per_minute,
            q_ws = d.app.quotas.websockets_per_token,
            q_logins = d.app.quotas.logins_per_minute_per_ip,
            q_bytes = d.app.quotas.bytes_per_core,
            q_request = d.app.quotas.max_request_bytes,
            max_loaded = d.cores.max_loaded,
            max_loaded_mib = d.cores.max_loaded_mib,
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
    fn dht_mode_follows_autonat_by_default_and_explicit_modes_still_parse() {
        assert_eq!(Config::default().node_config().swarm.dht_mode, swarm::DhtMode::Auto);
        for (text, mode) in [("server", swarm::DhtMode::Server), ("client", swarm::DhtMode::Client), ("auto", swarm::DhtMode::Auto)] {
            let config = Config::parse(&format!("[network]\ndht_mode = \"{text}\"\n")).unwrap();
            assert_eq!(config.node_config().swarm.dht_mode, mode);
        }
    }

    #[test]
    fn bootstrap_and_relay_nodes_serve_circuits_within_the_configured_limits() {
        assert!(Config::default().node_config().swarm.nat.relay_server.is_none());
        let config = Config::parse("[network]\nrelay = true\nrelay_max_reservations = 3\nrelay_circuit_bytes = 4096\n").unwrap();
        let limits = config.node_config().swarm.nat.relay_server.expect("a relay");
        assert_eq!((limits.max_reservations, limits.max_circuit_bytes), (3, 4096));
        let bootstrap = Config::parse("[network]\nbootstrap = true\n").unwrap();
        assert!(bootstrap.node_config().swarm.nat.relay_server.is_some());
        let err = Config::parse("[network]\nrelay = true\nrelay_max_circuits = 0\n").unwrap_err();
        assert!(format!("{err:#}").contains("relay_max_circuits"), "{err:#}");
    }

    #[test]
    fn malformed_multiaddr_is_refused() {
        let err = Config::parse("[network]\npeers = [\"/ip4/not-an-ip/tcp/1\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("peers"), "{err:#}");
    }
}
