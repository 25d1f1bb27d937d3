//! `kubelt`: the Kubelt node binary. Thin: parsing and the CLI live in `cli/`, the node in the
//! `kubelt-protocol` library.

mod api_client;
mod apps;
mod cli;
mod config;
mod content;
mod gateway;
mod metrics;
mod repo;
mod rpc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let cli = cli::Cli::parse();
    match cli::execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
