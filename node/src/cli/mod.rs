//! The `kubelt` command line: one file per group of subcommands.

mod content;
mod core;
mod init;
mod msg;
mod query;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;

use crate::repo::Repo;

#[derive(Debug, Parser)]
#[command(name = "kubelt", version, about = "Kubelt node: your own peer-to-peer personal backend", long_about = None)]
pub struct Cli {
    /// Repo directory (default ~/.kubelt).
    #[arg(long, global = true, env = "KUBELT_REPO", value_name = "DIR")]
    pub repo: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repo: node key, commented config.toml, database.
    Init {
        /// Write a new key and config over an existing repo (the data is kept).
        #[arg(long)]
        force: bool,
    },
    /// Run the node in the foreground (Ctrl-C stops it cleanly).
    Run(run::RunArgs),
    /// Show this node's peer id and addresses.
    Id {
        #[arg(long)]
        json: bool,
    },
    /// Peers and connections.
    Swarm {
        #[command(subcommand)]
        command: SwarmCommand,
    },
    /// Show peers, DHT size and counters of the running node.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Import a file or directory (same CIDs as `ipfs add`) and pin it.
    Add(content::AddArgs),
    /// Write a file to stdout, fetching missing blocks from the network.
    Cat {
        /// CID or CID/path.
        path: String,
        /// A private object of this core (`add --private`): decrypt it. Needs the running
        /// node to hold the core's key.
        #[arg(long, value_name = "0xOWNER")]
        core: Option<String>,
    },
    /// Write a file or directory tree to disk, fetching missing blocks from the network.
    Get {
        /// CID or CID/path.
        path: String,
        /// Where to write it (default: the last path segment, in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// A private object of this core (`add --private`): write it decrypted. Needs the
        /// running node to hold the core's key.
        #[arg(long, value_name = "0xOWNER")]
        core: Option<String>,
    },
    /// Pins keep content from garbage collection.
    Pin {
        #[command(subcommand)]
        command: content::PinCommand,
    },
    /// Repo maintenance.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// CAR v1 import and export.
    Dag {
        #[command(subcommand)]
        command: content::DagCommand,
    },
    /// Cores: wallet-owned state replicated between nodes.
    Core {
        #[command(subcommand)]
        command: core::CoreCommand,
    },
    /// Encrypted messages between cores.
    Msg {
        #[command(subcommand)]
        command: msg::MsgCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Delete every block that no pin reaches.
    Gc,
}

#[derive(Debug, Subcommand)]
pub enum SwarmCommand {
    /// List connected peers.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Connect to a peer by multiaddr.
    Connect {
        #[arg(value_name = "MADDR")]
        addr: Multiaddr,
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    fn repo(&self) -> Repo {
        Repo::new(self.repo.clone().unwrap_or_else(Repo::default_path))
    }
}

/// Runs the parsed command line.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let repo = cli.repo();
    match cli.command {
        Command::Init { force } => init::init(&repo, force),
        Command::Run(args) => run::run(&repo, args),
        Command::Id { json } => query::id(&repo, json),
        Command::Swarm { command: SwarmCommand::Peers { json } } => query::swarm_peers(&repo, json),
        Command::Swarm { command: SwarmCommand::Connect { addr, json } } => query::swarm_connect(&repo, addr, json),
        Command::Status { json } => query::status(&repo, json),
        Command::Add(args) => content::add(&repo, args),
        Command::Cat { path, core: None } => content::cat(&repo, &path),
        Command::Cat { path, core: Some(core) } => content::cat_private(&repo, &path, &core),
        Command::Get { path, output, core } => content::get(&repo, &path, output, core.as_deref()),
        Command::Pin { command } => content::pin(&repo, command),
        Command::Repo { command: RepoCommand::Gc } => content::gc(&repo),
        Command::Dag { command } => content::dag(&repo, command),
        Command::Core { command } => core::core(&repo, command),
        Command::Msg { command } => msg::msg(&repo, command),
    }
}
