//! Shared by the tests of this crate: logging, and what the Kubo interop tests do without Kubo
//! (see [`kubelt_protocol::testing::kubo`]).
#![allow(dead_code)]

#[allow(unused_imports)]
pub(crate) use kubelt_protocol::testing::kubo::kubo_missing;

/// A missing Kubo: an error saying how to install it, or, opted out, a recorded skip (`Ok`).
pub(crate) fn skip_or_fail(test: &str, reason: &str) -> anyhow::Result<()> {
    kubelt_protocol::testing::kubo::skip_or_fail(test, reason).map_err(anyhow::Error::msg)
}

/// Logs of the nodes a test runs, through the harness's capture (shown for failing tests);
/// `RUST_LOG` sets the level, warnings by default.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A random base for `/memory/<port>` addresses, so tests running at once never share one.
pub(crate) fn base_port() -> u64 {
    rand::random::<u32>() as u64 * 1000 + 1
}

/// A bare swarm on the memory transport (noise, yamux) with `behaviour`, closing connections
/// idle for `idle`: for tests that play a peer no node would be (a hand-made gossip peer).
pub(crate) fn memory_swarm<B: libp2p::swarm::NetworkBehaviour>(
    key: libp2p::identity::Keypair,
    idle: std::time::Duration,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> Result<B, Box<dyn std::error::Error + Send + Sync>>,
) -> anyhow::Result<libp2p::Swarm<B>> {
    use libp2p::core::Transport as _;
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            let noise = libp2p::noise::Config::new(key).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                libp2p::core::transport::MemoryTransport::default()
                    .upgrade(libp2p::core::upgrade::Version::V1)
                    .authenticate(noise)
                    .multiplex(libp2p::yamux::Config::default()),
            )
        })?
        .with_behaviour(behaviour)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

/// Three nodes of one core: 0 and 1 delegated writers, 2 a follower, 1 and 2 connected to 0.
pub(crate) async fn two_writers_and_a_follower() -> anyhow::Result<kubelt_protocol::testing::Cluster> {
    let cluster = kubelt_protocol::testing::Cluster::start(3).await?;
    cluster.connect(1, 0).await?;
    cluster.connect(2, 0).await?;
    cluster.delegate(0).await?;
    cluster.delegate(1).await?;
    cluster.follow(2).await?;
    Ok(cluster)
}
