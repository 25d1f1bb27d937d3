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
            },
            target_peers = d.network.target_peers,
            max_connections = d.network.max_connections,
            idle = d.network.idle_connection_timeout_secs,
            bootstrap_interval = d.network.bootstrap_interval_secs,
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
    fn malformed_multiaddr_is_refused() {
        let err = Config::parse("[network]\npeers = [\"/ip4/not-an-ip/tcp/1\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("peers"), "{err:#}");
    }
}
