//! The composed libp2p `NetworkBehaviour` of a Kubelt node and how its swarm is built.
//!
//! Transports: TCP (TLS 1.3 or noise, then yamux), QUIC v1, and libp2p's in-process memory transport (for
//! tests that run dozens of nodes in one process). Protocols: identify `/ipfs/id/1.0.0`
//! (agent `kubelt/<version>`), ping `/ipfs/ping/1.0.0`, and Kademlia on our own DHT
//! `/kubelt/kad/1.0.0` (never the public IPFS DHT), and bitswap `/ipfs/bitswap/1.2.0` (with
//! 1.1.0 and 1.0.0) for content, wire-compatible with Kubo; gossipsub v1.1 and
//! `/kubelt/core-sync/1.0.0` for cores (see [`crate::sync`]); AutoNAT v1 and v2, circuit relay
//! v2 (client always, server on relays) and DCUtR for nodes behind NAT (see [`crate::nat`]).

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::core::transport::{MemoryTransport, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, identify, noise, ping, relay, request_response, yamux, StreamProtocol, Swarm,
    SwarmBuilder,
};

use crate::bitswap;
use crate::dht_store::{self, DhtStore};
use crate::nat;
use crate::store::Store;
use crate::sync;

/// Kademlia protocol id of the Kubelt DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/kubelt/kad/1.0.0");
/// How many requests a Kademlia query keeps in flight (α).
pub const KAD_PARALLELISM: usize = 3;
/// Identify protocol id (the standard one, so Kubo peers can identify us).
pub const IDENTIFY_PROTOCOL: &str = "/ipfs/id/1.0.0";

/// Every protocol a Kubelt node with this configuration speaks, for `info()`: a protocol added
/// to [`Behaviour`] is named here too. The relay's hop protocol only where the node serves
/// circuits, AutoNAT's only where it runs (`nat.autonat`).
pub fn protocols(config: &Config) -> Vec<String> {
    let mut all = vec![IDENTIFY_PROTOCOL.to_string(), "/ipfs/ping/1.0.0".to_string(), KAD_PROTOCOL.to_string()];
    all.extend(bitswap::PROTOCOLS.iter().map(|p| p.to_string()));
    all.push(sync::CORE_SYNC_PROTOCOL.to_string());
    all.push("/meshsub/1.1.0".to_string());
    if config.nat.autonat {
        all.push(autonat::DEFAULT_PROTOCOL_NAME.to_string());
        // libp2p keeps AutoNAT v2's protocol ids private.
        all.push("/libp2p/autonat/2/dial-request".to_string());
        all.push("/libp2p/autonat/2/dial-back".to_string());
    }
    all.push(relay::STOP_PROTOCOL_NAME.to_string());
    if config.nat.relay_server.is_some() {
        all.push(relay::HOP_PROTOCOL_NAME.to_string());
    }
    all.push(dcutr::PROTOCOL_NAME.to_string());
    all
}

/// The agent version announced over identify.
pub fn agent_version() -> String {
    format!("kubelt/{}", env!("CARGO_PKG_VERSION"))
}

/// How this node takes part in the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Answer DHT queries: for bootstrap nodes and reachable nodes.
    #[default]
    Server,
    /// Only ask: for nodes behind NAT that others cannot dial.
    Client,
    /// Follow AutoNAT: client while the node is private, server otherwise (public, or not
    /// known yet: a node nobody can judge, e.g. on a LAN, keeps serving as before).
    Auto,
}

/// Settings of the swarm.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether to answer DHT queries or only ask.
    pub dht_mode: DhtMode,
    /// How often Kademlia re-runs its bootstrap (random walk) to refresh the routing table.
    pub bootstrap_interval: Duration,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most connections to one peer.
    pub max_connections_per_peer: u32,
    /// Most connections still being negotiated.
    pub max_pending: u32,
    /// How long a connection stays up once idle: no request or transfer open, and not kept
    /// (see [`sync::Gossip`]: connections to replicas of a core this node holds are kept, and
    /// so are the first [`Config::keep_peers`] others and the peers that dialed this node, up
    /// to three times as many).
    pub idle_connection_timeout: Duration,
    /// Connections kept open although idle, replicas included (a low water mark, as Kubo's
    /// connection manager has): a node with few peers keeps them. Peers that dialed this node
    /// are kept too while fewer than three times this many are kept (the high water mark), so
    /// that a peer keeping the connection finds it kept at this end as well. The node sets it
    /// to its `target_peers`.
    pub keep_peers: usize,
    /// Timeout of one DHT query.
    pub kad_query_timeout: Duration,
    /// How often every connection is pinged; one silent for two intervals and 2 s is closed
    /// (see [`Config::ping_silence`]). 5 s notices a partition within ~12 s.
    pub ping_interval: Duration,
    /// Gossipsub's heartbeat: how often meshes are repaired and lazy gossip (IHAVE) is sent.
    pub gossip_heartbeat: Duration,
    /// Bitswap tuning.
    pub bitswap: bitswap::Config,
    /// AutoNAT and relay settings.
    pub nat: nat::Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dht_mode: DhtMode::Server,
            bootstrap_interval: Duration::from_secs(300),
            max_connections: 256,
            max_connections_per_peer: 8,
            max_pending: 64,
            // Peers met through DHT queries: Kademlia dials every peer a query asks, so with a
            // long timeout every node ends up connected to most of the network.
            idle_connection_timeout: Duration::from_secs(30),
            keep_peers: 16,
            kad_query_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(5),
            gossip_heartbeat: Duration::from_millis(500),
            bitswap: bitswap::Config::default(),
            nat: nat::Config::default(),
        }
    }
}

impl Config {
    /// Settings for a bootstrap node: DHT server, many more connections, a relay.
    pub fn bootstrap() -> Self {
        let nat = nat::Config { relay_server: Some(nat::RelayLimits::default()), ..nat::Config::default() };
        Config { dht_mode: DhtMode::Server, max_connections: 2048, max_pending: 256, nat, ..Config::default() }
    }

    /// How long a connection that answered pings may stay silent before the node closes it:
    /// the ping interval, the ping's timeout (as long as the interval) and 2 s of slack.
    pub fn ping_silence(&self) -> Duration {
        self.ping_interval.saturating_mul(2) + Duration::from_secs(2)
    }
}

pub use behaviour::{Behaviour, BehaviourEvent};

/// The composed behaviour, in its own module because the derive generates `BehaviourEvent`
/// (one variant per field, each the field's own event type) without doc comments.
mod behaviour {
    #![allow(missing_docs)]
    use super::*;

    /// Every protocol a Kubelt node speaks.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Peers this node refuses: their connections are closed and new ones denied, in both
        /// directions, until unblocked (see [`crate::node::Client::block_peer`]).
        pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
        /// Caps connections so a flood of dials cannot exhaust the node.
        pub limits: connection_limits::Behaviour,
        /// `/ipfs/id/1.0.0`: agent versions, listen addresses, protocols.
        pub identify: identify::Behaviour,
        /// `/ipfs/ping/1.0.0`: dead connections are closed.
        pub ping: ping::Behaviour,
        /// `/kubelt/kad/1.0.0`: peer routing, content and core providers.
        pub kad: kad::Behaviour<DhtStore>,
        /// `/ipfs/bitswap/1.2.0` (and older): blocks, with Kubo.
        pub bitswap: bitswap::Behaviour,
        /// Gossipsub v1.1: core changes on `kubelt/core/<address>`; it also decides which idle
        /// connections stay open ([`sync::Gossip`]).
        pub gossipsub: sync::Gossip,
        /// `/kubelt/core-sync/1.0.0`: catch-up.
        pub core_sync: request_response::Behaviour<sync::CoreSyncCodec>,
        /// `/kubelt/msg/1.0.0`: messages between cores (see [`crate::msg`]).
        pub msg: request_response::Behaviour<crate::msg::MsgCodec>,
        /// AutoNAT v1 (client and server): the public/private verdict ([`nat::Config::autonat`]).
        pub autonat: Toggle<autonat::Behaviour>,
        /// AutoNAT v2 client: confirms candidate addresses one by one.
        pub autonat_client: Toggle<autonat::v2::client::Behaviour>,
        /// AutoNAT v2 server: dials others back.
        pub autonat_server: Toggle<autonat::v2::server::Behaviour>,
        /// Circuit relay v2 server (hop), on bootstrap nodes and `relay = true`.
        pub relay: Toggle<relay::Behaviour>,
        /// Circuit relay v2 client: reservations and relayed dials.
        pub relay_client: relay::client::Behaviour,
        /// DCUtR: hole punching from a relayed connection to a direct one.
        pub dcutr: dcutr::Behaviour,
    }
}

/// Errors building the swarm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Noise could not be set up with the node key.
    #[error("noise setup failed: {0}")]
    Noise(#[from] noise::Error),
    /// TLS could not be set up with the node key (its self-signed certificate).
    #[error("TLS setup failed: {0}")]
    Tls(#[from] libp2p_tls::certificate::GenError),
    /// A transport or behaviour could not be built.
    #[error("building the behaviour failed: {0}")]
    Behaviour(String),
    /// Gossipsub or core-sync could not be set up.
    #[error(transparent)]
    Sync(#[from] sync::SyncSetupError),
}

/// Builds the swarm for `keypair` with the given settings. Listening and dialing are the
/// caller's job (see [`crate::node`]).
pub fn build(keypair: Keypair, config: &Config, store: Store) -> Result<Swarm<Behaviour>, BuildError> {
    build_counted(keypair, config, store, sync::GossipCounters::default())
}

/// [`build`], with gossipsub counting what it receives and publishes into `gossip`.
pub fn build_counted(keypair: Keypair, config: &Config, store: Store, gossip: sync::GossipCounters) -> Result<Swarm<Behaviour>, BuildError> {
    let config = config.clone();
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        // TLS 1.3 first, noise second: the dialer proposes them in this order and the listener
        // takes the first it speaks. TLS runs AES-GCM (the patched libp2p-tls), which costs a
        // fraction of noise's ChaCha20-Poly1305 on CPUs with AES instructions, and Kubo offers
        // and accepts both; noise stays for peers without TLS (DESIGN.md names noise).
        .with_tcp(libp2p::tcp::Config::default().nodelay(true), (libp2p_tls::Config::new, noise::Config::new), yamux_config)
        .map_err(|e| e.either(BuildError::Tls, BuildError::Noise))?
        .with_quic_config(|mut quic| {
            // Larger flow-control windows than the defaults: loopback and LAN transfers of big
            // files are bounded by them, not by the link.
            quic.max_stream_data = 16 * 1024 * 1024;
            quic.max_connection_data = 64 * 1024 * 1024;
            quic
        })
        .with_other_transport(|key| {
            let noise = noise::Config::new(key).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise)
                    .multiplex(yamux_config())
                    .timeout(Duration::from_secs(20)),
            )
        })
        .map_err(|e| BuildError::Behaviour(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux_config)?
        .with_behaviour(|key, relay_client| {
            new_behaviour(key, &config, store, relay_client, gossip).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| BuildError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    // Bitswap and core sync open many short streams per connection.
    config.set_max_num_streams(1024);
    config
}

fn new_behaviour(key: &Keypair, config: &Config, store: Store, relay_client: relay::client::Behaviour, gossip: sync::GossipCounters) -> Result<Behaviour, BuildError> {
    let peer_id = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_pending))
        .with_max_pending_outgoing(Some(config.max_pending));

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
            .with_agent_version(agent_version())
            .with_interval(Duration::from_secs(300))
            // No cache of peers' announced addresses: it hands every dial of a peer all of
            // them, loopback included, and a peer at home dialing "its" 127.0.0.1 reaches
            // itself and fails the whole dial on the wrong peer id, the relay circuit with it
            // (a lost replica behind NAT was never redialed). The peer book and Kademlia keep
            // the addresses worth dialing (`dialable_addresses`).
            .with_cache_size(0),
    );

    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config
        .set_query_timeout(config.kad_query_timeout)
        .set_periodic_bootstrap_interval(Some(config.bootstrap_interval))
        .set_parallelism(NonZeroUsize::new(KAD_PARALLELISM).unwrap_or(NonZeroUsize::MIN))
        // The event loop decides who enters the routing table (`dht_routing`): no liveness
        // dial for every newcomer to a full bucket.
        .set_kbucket_inserts(kad::BucketInserts::Manual);
    let mut kad = kad::Behaviour::with_config(peer_id, DhtStore::new(peer_id, dht_store::Limits::default()), kad_config);
    // `Auto` starts as a server and follows AutoNAT's verdict (the event loop switches it).
    kad.set_mode(Some(match config.dht_mode {
        DhtMode::Server | DhtMode::Auto => kad::Mode::Server,
        DhtMode::Client => kad::Mode::Client,
    }));
    let relay = config.nat.relay_server.as_ref().map(|limits| {
        let mut relay = relay::Behaviour::new(peer_id, limits.relay_config());
        // Serve whatever our external addresses are: the operator said so.
        relay.set_status(Some(relay::Status::Enable));
        relay
    });

    Ok(Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        identify,
        // A ping every 5 s (by default) with as long a timeout: a dead connection (a cut cable
        // drops packets and tells nobody) is noticed and closed within ~12 s, and the catch-up
        // scheduler dials the replica again every second, so a partition heals within about a
        // second of the network coming back instead of waiting out TCP's retransmission
        // backoff on the old connection (10 s and more after a 15 s cut).
        ping: ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval).with_timeout(config.ping_interval)),
        kad,
        bitswap: bitswap::Behaviour::new(store, config.bitswap.clone()),
        gossipsub: sync::Gossip::new(sync::gossipsub(key, gossip, config.gossip_heartbeat)?, config.keep_peers),
        core_sync: sync::core_sync(),
        msg: crate::msg::behaviour(),
        autonat: Toggle::from(config.nat.autonat.then(|| autonat::Behaviour::new(peer_id, config.nat.autonat_config()))),
        autonat_client: Toggle::from(config.nat.autonat.then(autonat::v2::client::Behaviour::default)),
        autonat_server: Toggle::from(config.nat.autonat.then(autonat::v2::server::Behaviour::default)),
        relay: Toggle::from(relay),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QUIC's TLS offers AES-128-GCM first (the patched libp2p-tls in `vendor/`): ChaCha20 first,
    /// upstream's order, costs a fifth of QUIC's transfer speed. Fails if a dependency update
    /// leaves the patch unused.
    #[test]
    fn quic_tls_prefers_aes_gcm() -> anyhow::Result<()> {
        let key = Keypair::generate_ed25519();
        let client = libp2p_tls::make_client_config(&key, None)?;
        let server = libp2p_tls::make_server_config(&key)?;
        for suites in [&client.crypto_provider().cipher_suites, &server.crypto_provider().cipher_suites] {
            let order: Vec<_> = suites.iter().map(|s| s.suite()).collect();
            assert_eq!(order.first(), Some(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256), "cipher order {order:?}");
            assert!(order.contains(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256), "ChaCha stays accepted: {order:?}");
        }
        Ok(())
    }

    /// The QUIC transport asks the kernel for big socket buffers (the patched libp2p-quic in
    /// `vendor/`): with Linux's default receive buffer a 100 MiB transfer lost ~85 packets at
    /// the socket and ran 12 % slower. Fails if a dependency update leaves the patch unused.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn quic_sockets_get_bigger_kernel_buffers_than_the_default() -> anyhow::Result<()> {
        use anyhow::Context as _;
        use libp2p::core::transport::{ListenerId, Transport as _, TransportEvent};
        use libp2p::multiaddr::Protocol;
        let key = Keypair::generate_ed25519();
        let mut transport = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(&key));
        transport.listen_on(ListenerId::next(), "/ip4/127.0.0.1/udp/0/quic-v1".parse()?)?;
        let port = loop {
            let event = std::future::poll_fn(|cx| std::pin::Pin::new(&mut transport).poll(cx)).await;
            if let TransportEvent::NewAddress { listen_addr, .. } = event {
                break listen_addr.iter().find_map(|p| if let Protocol::Udp(port) = p { Some(port) } else { None }).context("no UDP port")?;
            }
        };
        let default: i32 = std::fs::read_to_string("/proc/sys/net/core/rmem_default")?.trim().parse()?;
        let rcvbuf = udp_receive_buffer(port)?.context("the listener's socket is not among this process's descriptors")?;
        assert!(rcvbuf > default, "receive buffer {rcvbuf} B, the kernel's default {default} B");
        Ok(())
    }

    /// yamux writes the frames it queues in one poll with one write (the patched yamux in
    /// `vendor/`): unpatched, each frame's header and body were two writes, and over TLS two
    /// records and two system calls, ~8 per block a Kubo peer sent us. Twenty streams' first
    /// frames, queued before the connection is polled, must leave in fewer writes than frames.
    /// Fails if a dependency update leaves the patch unused.
    #[tokio::test]
    async fn yamux_writes_the_frames_of_one_poll_together() -> anyhow::Result<()> {
        use futures::{AsyncReadExt as _, AsyncWriteExt as _};
        use libp2p::core::muxing::StreamMuxerExt as _;
        use libp2p::core::upgrade::{InboundConnectionUpgrade as _, OutboundConnectionUpgrade as _};
        use std::pin::Pin;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::{Context, Poll};

        /// Counts the writes that reach the socket.
        struct CountWrites(libp2p::tcp::tokio::TcpStream, Arc<AtomicUsize>);
        impl futures::AsyncRead for CountWrites {
            fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        impl futures::AsyncWrite for CountWrites {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                let written = Pin::new(&mut self.0).poll_write(cx, buf);
                if written.is_ready() {
                    self.1.fetch_add(1, Ordering::SeqCst);
                }
                written
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_close(cx)
            }
        }

        const STREAMS: usize = 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (dialed, accepted) = tokio::join!(tokio::net::TcpStream::connect(listener.local_addr()?), listener.accept());
        let writes = Arc::new(AtomicUsize::new(0));
        let socket = CountWrites(libp2p::tcp::tokio::TcpStream(dialed?), writes.clone());
        let mut dialer = yamux_config().upgrade_outbound(socket, "/yamux/1.0.0").await?;
        let mut listener = yamux_config().upgrade_inbound(libp2p::tcp::tokio::TcpStream(accepted?.0), "/yamux/1.0.0").await?;

        // Every stream queues its first frame (100 bytes) before the connection is polled.
        let mut outbound = Vec::new();
        for i in 0..STREAMS {
            let mut stream = std::future::poll_fn(|cx| dialer.poll_outbound_unpin(cx)).await?;
            stream.write_all(&[i as u8; 100]).await?;
            outbound.push(stream);
        }
        let before = writes.load(Ordering::SeqCst);
        let drive_dialer = tokio::spawn(std::future::poll_fn(move |cx| {
            let _ = dialer.poll_unpin(cx);
            Poll::<()>::Pending
        }));

        // Every byte arrives, stream by stream.
        let mut inbound = Vec::new();
        while inbound.len() < STREAMS {
            inbound.push(std::future::poll_fn(|cx| listener.poll_inbound_unpin(cx)).await?);
        }
        let read = async {
            let mut firsts = Vec::new();
            for stream in &mut inbound {
                let mut buf = [0u8; 100];
                stream.read_exact(&mut buf).await?;
                assert!(buf.iter().all(|b| *b == buf[0]), "a stream's bytes got mixed: {buf:?}");
                firsts.push(buf[0]);
            }
            anyhow::Ok(firsts)
        };
        let drive_listener = std::future::poll_fn(|cx| {
            let _ = listener.poll_unpin(cx);
            Poll::<()>::Pending
        });
        let firsts = tokio::select! {
            firsts = tokio::time::timeout(Duration::from_secs(10), read) => firsts??,
            () = drive_listener => unreachable!(),
        };
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..STREAMS as u8).collect::<Vec<_>>(), "streams' first bytes: {firsts:?}");
        let frames_writes = writes.load(Ordering::SeqCst) - before;
        assert!(frames_writes < STREAMS, "{STREAMS} frames took {frames_writes} writes");
        drive_dialer.abort();
        drop(outbound);
        Ok(())
    }

    /// `SO_RCVBUF` of this process's IPv4 UDP socket bound to `port`, found among its descriptors.
    #[cfg(target_os = "linux")]
    fn udp_receive_buffer(port: u16) -> anyhow::Result<Option<i32>> {
        use std::os::fd::BorrowedFd;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Ok(fd) = entry?.file_name().to_string_lossy().parse::<std::os::fd::RawFd>() else { continue };
            // SAFETY: the descriptor is borrowed only for the calls below; one that is not a
            // socket (or closed since the listing) makes them fail, and it is skipped.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            let bound = socket.local_addr().ok().and_then(|a| a.as_socket_ipv4()).is_some_and(|a| a.port() == port);
            if bound && socket.r#type().is_ok_and(|t| t == socket2::Type::DGRAM) {
                return Ok(Some(i32::try_from(socket.recv_buffer_size()?)?));
            }
        }
        Ok(None)
    }

    /// A node's TCP listener on 127.0.0.1, driven by a task of its own; returns its address.
    async fn tcp_node() -> anyhow::Result<(libp2p::Multiaddr, tokio::task::JoinHandle<()>)> {
        use futures::StreamExt as _;
        let mut node = build(Keypair::generate_ed25519(), &Config::default(), Store::in_memory())?;
        node.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        let addr = loop {
            if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } = node.select_next_some().await {
                break address;
            }
        };
        Ok((addr, tokio::spawn(async move { while node.next().await.is_some() {} })))
    }

    /// A swarm with nothing but TCP, one security protocol (TLS or noise) and yamux: a peer
    /// that speaks only that one.
    fn tcp_peer_with_only(tls: bool) -> anyhow::Result<Swarm<libp2p::swarm::dummy::Behaviour>> {
        let builder = SwarmBuilder::with_new_identity().with_tokio();
        let tcp = libp2p::tcp::Config::default();
        let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(30));
        Ok(if tls {
            builder.with_tcp(tcp, libp2p_tls::Config::new, yamux_config)?.with_behaviour(|_| libp2p::swarm::dummy::Behaviour)?.with_swarm_config(idle).build()
        } else {
            builder.with_tcp(tcp, noise::Config::new, yamux_config)?.with_behaviour(|_| libp2p::swarm::dummy::Behaviour)?.with_swarm_config(idle).build()
        })
    }

    /// Dials `addr` from `peer`: whether the connection comes up, within 10 s.
    async fn reaches(mut peer: Swarm<libp2p::swarm::dummy::Behaviour>, addr: libp2p::Multiaddr) -> anyhow::Result<bool> {
        use futures::StreamExt as _;
        use libp2p::swarm::SwarmEvent;
        peer.dial(addr)?;
        let outcome = async {
            loop {
                match peer.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => return true,
                    SwarmEvent::OutgoingConnectionError { .. } => return false,
                    _ => {}
                }
            }
        };
        Ok(tokio::time::timeout(Duration::from_secs(10), outcome).await?)
    }

    /// A node takes TCP connections secured by TLS (the peers that prefer it: Kubo, kubelt)
    /// and by noise (DESIGN.md's protocol, every libp2p peer).
    #[tokio::test]
    async fn tcp_accepts_tls_and_noise() -> anyhow::Result<()> {
        let (addr, node) = tcp_node().await?;
        assert!(reaches(tcp_peer_with_only(true)?, addr.clone()).await?, "a TLS-only peer was refused");
        assert!(reaches(tcp_peer_with_only(false)?, addr).await?, "a noise-only peer was refused");
        node.abort();
        Ok(())
    }

    /// A node dialing over TCP proposes TLS before noise (multistream-select: the listener takes
    /// the first proposal it speaks), read off the bytes it sends to a plain TCP listener.
    #[tokio::test]
    async fn tcp_dialer_proposes_tls_before_noise() -> anyhow::Result<()> {
        use futures::StreamExt as _;
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut node = build(Keypair::generate_ed25519(), &Config::default(), Store::in_memory())?;
        node.dial(format!("/ip4/127.0.0.1/tcp/{}", listener.local_addr()?.port()).parse::<libp2p::Multiaddr>()?)?;
        let node = tokio::spawn(async move { while node.next().await.is_some() {} });
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await??;
        let mut sent = Vec::new();
        let find = |sent: &[u8], needle: &[u8]| sent.windows(needle.len()).position(|w| w == needle);
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 256];
            loop {
                let n = socket.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "the dialer closed after {:?}", String::from_utf8_lossy(&sent));
                sent.extend_from_slice(&buf[..n]);
                if let Some(at) = find(&sent, b"/tls/1.0.0").or_else(|| find(&sent, b"/noise")) {
                    return Ok(sent[at..].starts_with(b"/tls/1.0.0"));
                }
            }
        })
        .await??;
        node.abort();
        assert!(first, "the first security protocol proposed was not TLS: {:?}", String::from_utf8_lossy(&sent));
        Ok(())
    }

    #[test]
    fn info_names_autonat_and_the_relay_hop_only_where_they_run() {
        let names = |config: &Config| protocols(config).into_iter().filter(|p| p.contains("autonat") || p.as_str() == relay::HOP_PROTOCOL_NAME.as_ref()).count();
        let plain = Config::default();
        assert_eq!(names(&plain), 3, "AutoNAT v1 and v2's two protocols, no hop: {:?}", protocols(&plain));
        let mut quiet = Config::default();
        quiet.nat.autonat = false;
        assert_eq!(names(&quiet), 0, "{:?}", protocols(&quiet));
        assert_eq!(names(&Config::bootstrap()), 4, "a bootstrap serves circuits: {:?}", protocols(&Config::bootstrap()));
    }
}
