//! `kubelt run`: start the node in the foreground.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;

use crate::repo::Repo;
use crate::rpc;
use kubelt_protocol::node::Node;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Listen on this multiaddr instead of the configured ones (repeatable).
    #[arg(long, value_name = "MADDR")]
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peer to join through, e.g. /ip4/127.0.0.1/tcp/4420/p2p/12D3Koo... (repeatable;
    /// added to the configured ones).
    #[arg(long = "peer", value_name = "MADDR")]
    pub peers: Vec<Multiaddr>,
    /// HOST:PORT of the JSON-RPC API and gateway.
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,
    /// Bootstrap mode: DHT server, higher connection limits.
    #[arg(long)]
    pub bootstrap: bool,
    /// Create the repo with defaults first if it does not exist.
    #[arg(long)]
    pub init: bool,
}

pub fn run(repo: &Repo, args: RunArgs) -> anyhow::Result<()> {
    if !repo.is_initialized() {
        if args.init {
            let peer = repo.init(false)?;
            eprintln!("initialized a new repo at {} (peer id {peer})", repo.root().display());
        } else {
            anyhow::bail!("no repo at {} (create one with `kubelt init`)", repo.root().display());
        }
    }
    let mut config = repo.load_config()?;
    if !args.listen.is_empty() {
        config.network.listen = args.listen;
    }
    config.network.peers.extend(args.peers);
    if let Some(api) = args.api {
        config.api.listen = api;
    }
    if args.bootstrap {
        config.network.bootstrap = true;
    }
    let keypair = repo.load_key()?;
    // The database lock is what makes a second `run` on the same repo fail, before anything in
    // the repo is touched.
    let store = repo.open_store()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let api_listener = rpc::bind(config.api.listen).await?;
        let api_addr = api_listener.local_addr()?;
        let node = Node::start(keypair, store.clone(), config.node_config()).await?;
        let secret: Arc<str> = repo.write_cookie()?.into();
        let api_url = format!("http://{api_addr}/");
        repo.write_api_url(&api_url)?;

        let info = node.client.info().await?;
        println!("kubelt node {} running", info.agent_version);
        println!("peer id: {}", info.peer_id);
        for addr in &info.addresses {
            println!("listening on {addr}");
        }
        println!("API: {api_url} (secret in {})", repo.cookie_path().display());
        if config.network.bootstrap {
            println!("bootstrap mode: other nodes can join with --peer <one of the addresses above>");
        }

        let shutdown = node.shutdown_token();
        let state = rpc::ApiState { client: node.client.clone(), store, secret, gc_lock: Default::default() };
        let api_shutdown = shutdown.clone();
        let api = tokio::spawn(rpc::serve(api_listener, state, async move { api_shutdown.cancelled().await }));

        wait_for_signal().await?;
        tracing::info!("shutting down");
        node.stop().await;
        let _ = api.await;
        repo.remove_api_url();
        eprintln!("kubelt node stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
