//! `kubelt run`: start the node in the foreground.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;

use crate::repo::Repo;
use crate::{gateway, rpc};
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
    /// HOST:PORT of the JSON-RPC admin API and /metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,
    /// HOST:PORT of the read-only gateway (GET /ipfs/...).
    #[arg(long, value_name = "HOST:PORT")]
    pub gateway: Option<SocketAddr>,
    /// HOST:PORT of the app API (kb_*: wallet sign-in for web apps).
    #[arg(long = "app-api", value_name = "HOST:PORT")]
    pub app_api: Option<SocketAddr>,
    /// A wallet that may sign in to the app API (repeatable; added to [app] owners).
    #[arg(long = "owner", value_name = "0xADDRESS")]
    pub owners: Vec<String>,
    /// Let any wallet sign in to the app API and have its core here, under the quotas.
    #[arg(long)]
    pub hosted: bool,
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
    if let Some(gateway) = args.gateway {
        config.gateway.listen = gateway;
    }
    if args.bootstrap {
        config.network.bootstrap = true;
    }
    if let Some(app) = args.app_api {
        config.app.listen = app;
    }
    config.app.owners.extend(args.owners);
    config.app.hosted |= args.hosted;
    let app_settings = config.app.settings()?;
    let keypair = repo.load_key()?;
    // The database lock is what makes a second `run` on the same repo fail, before anything in
    // the repo is touched.
    let store = repo.open_store()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let api_listener = rpc::bind(config.api.listen).await?;
        let api_addr = api_listener.local_addr()?;
        let gateway_listener = gateway::bind(config.gateway.listen).await?;
        let gateway_url = local_url(gateway_listener.local_addr()?);
        let app_listener = rpc::app::bind(config.app.listen).await?;
        let app_addr = app_listener.local_addr()?;
        let app = Arc::new(rpc::app::App::new(&keypair, app_settings, repo.app_revoked_path())?);
        let node = Node::start(keypair, store.clone(), config.node_config()).await?;
        let secret: Arc<str> = repo.write_cookie()?.into();
        let api_url = local_url(api_addr);
        // The gateway's address first: once `api` exists, the CLI takes the node as ready.
        repo.write_gateway_url(&gateway_url)?;
        repo.write_app_url(&local_url(app_addr))?;
        repo.write_api_url(&api_url)?;

        let info = node.client.info().await?;
        println!("kubelt node {} running", info.agent_version);
        println!("peer id: {}", info.peer_id);
        for addr in &info.addresses {
            println!("listening on {addr}");
        }
        println!("API: {api_url} (secret in {})", repo.cookie_path().display());
        println!("gateway: {gateway_url}ipfs/<cid>");
        println!("app API: {}", local_url(app_addr));
        for name in crate::apps::names() {
            println!("example app: {}apps/{name}/", local_url(app_addr));
        }
        if config.network.bootstrap {
            println!("bootstrap mode: other nodes can join with --peer <one of the addresses above>");
        }

        let shutdown = node.shutdown_token();
        let allowed_hosts = rpc::AllowedHosts::new(api_addr, &config.api.allowed_hosts);
        let state = rpc::ApiState::new(node.client.clone(), store.clone(), secret, allowed_hosts, shutdown.clone());
        let api_shutdown = shutdown.clone();
        let api = tokio::spawn(rpc::serve(api_listener, state, async move { api_shutdown.cancelled().await }));
        let app_state = rpc::app::state(node.client.clone(), store.clone(), app, app_addr, shutdown.clone());
        let app_shutdown = shutdown.clone();
        let app_api = tokio::spawn(rpc::app::serve(app_listener, app_state, async move { app_shutdown.cancelled().await }));
        let gateway_state = gateway::GatewayState { client: node.client.clone(), store };
        let gateway_shutdown = shutdown.clone();
        let gateway = tokio::spawn(gateway::serve(gateway_listener, gateway_state, async move { gateway_shutdown.cancelled().await }));

        wait_for_signal().await?;
        tracing::info!("shutting down");
        node.stop().await;
        let _ = api.await;
        let _ = gateway.await;
        let _ = app_api.await;
        repo.remove_app_url();
        repo.remove_api_url();
        repo.remove_gateway_url();
        eprintln!("kubelt node stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

/// The URL the CLI on this machine uses to reach a listener. A wildcard address (0.0.0.0, ::)
/// becomes loopback: it is not an address to connect to, and the API answers only the node's
/// own `Host` names, which a wildcard is not.
fn local_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/", SocketAddr::new(ip, addr.port()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_through_loopback() {
        let url = |addr: &str| local_url(addr.parse().unwrap());
        assert_eq!(url("0.0.0.0:5420"), "http://127.0.0.1:5420/");
        assert_eq!(url("[::]:5420"), "http://[::1]:5420/");
        assert_eq!(url("192.0.2.7:5422"), "http://192.0.2.7:5422/");
        assert_eq!(url("127.0.0.1:5420"), "http://127.0.0.1:5420/");
    }
}
