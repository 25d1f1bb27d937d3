//! Content commands: `add`, `cat`, `get`, `pin`, `repo gc`, `dag export|import`.
//!
//! With a node running on the repo they go through its API (and can fetch missing blocks from
//! the network); with none they work straight on the repo's database, like `ipfs` offline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use kubelt_protocol::store::Store;
use kubelt_protocol::{car, unixfs};

use crate::api_client::ApiClient;
use crate::content::{self, AddRequest};
use crate::repo::Repo;

/// Where a content command runs.
enum Backend {
    /// Through the running node's API.
    Online(ApiClient),
    /// Straight on the database (no node running).
    Offline(Store),
}

impl Backend {
    fn open(repo: &Repo) -> anyhow::Result<Backend> {
        if let Ok(api) = ApiClient::for_repo(repo) {
            if api.call("node_id", Value::Null).is_ok() {
                return Ok(Backend::Online(api));
            }
        }
        if !repo.is_initialized() {
            anyhow::bail!("no repo at {} (create one with `kubelt init`)", repo.root().display());
        }
        Ok(Backend::Offline(repo.open_store()?))
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("invalid path {}", path.display()))
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// File or directory to add.
    pub path: PathBuf,
    /// Add a directory and everything below it.
    #[arg(short, long)]
    pub recursive: bool,
    /// CID version: 0 (Qm..., Kubo's default) or 1 (bafy..., raw leaves).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub cid_version: u8,
    /// Print only the root CID.
    #[arg(short, long)]
    pub quiet: bool,
    /// Include files whose name starts with '.'.
    #[arg(long)]
    pub hidden: bool,
    /// Do not pin the root.
    #[arg(long)]
    pub no_pin: bool,
    /// Encrypt the file under the core's data key first (a private object): only the owner's
    /// devices, and nodes the owner unlocked, can read it; the CID is the ciphertext's. Needs
    /// `--core` and a running node that writes that core.
    #[arg(long, requires = "core")]
    pub private: bool,
    /// The core whose key encrypts a `--private` file.
    #[arg(long, value_name = "0xOWNER", requires = "private")]
    pub core: Option<String>,
}

/// Private objects need the node's keys, which live in the running node.
fn needs_running_node(repo: &Repo) -> anyhow::Result<ApiClient> {
    match Backend::open(repo)? {
        Backend::Online(api) => Ok(api),
        Backend::Offline(_) => anyhow::bail!("private objects are encrypted with keys the running node holds: start it with `kubelt run` first"),
    }
}

pub fn add(repo: &Repo, args: AddArgs) -> anyhow::Result<()> {
    let path = absolute(&args.path)?;
    std::fs::symlink_metadata(&path).with_context(|| format!("cannot add {}", args.path.display()))?;
    let request = AddRequest { path: path.clone(), recursive: args.recursive, cid_version: args.cid_version, hidden: args.hidden, pin: !args.no_pin, core: args.core.clone() };
    let backend = match args.core {
        Some(_) => Backend::Online(needs_running_node(repo)?),
        None => Backend::open(repo)?,
    };
    let added: content::Added = match backend {
        Backend::Online(api) => {
            let spinner = ProgressBar::new_spinner().with_message(format!("adding {}", args.path.display()));
            spinner.enable_steady_tick(Duration::from_millis(120));
            let result = api.call("content_add", serde_json::to_value(&request)?);
            spinner.finish_and_clear();
            serde_json::from_value(result?)?
        }
        Backend::Offline(store) => {
            let total = tree_size(&path, args.hidden);
            let bar = ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let result = content::add(&store, &request, &mut |done| bar.set_position(done));
            bar.finish_and_clear();
            result?
        }
    };
    if args.quiet {
        println!("{}", added.cid);
    } else {
        println!("added {} {}", added.cid, added.name);
    }
    Ok(())
}

/// Bytes under `path`, for the progress bar.
fn tree_size(path: &Path, hidden: bool) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| hidden || !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| tree_size(&e.path(), hidden))
                .sum()
        })
        .unwrap_or(0)
}

/// Streams an HTTP response from the node's gateway to stdout.
fn stream_from_gateway(api: &ApiClient, path: &str) -> anyhow::Result<()> {
    let mut reader = api.gateway_get(path)?;
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut reader, &mut stdout).context("cannot write to stdout")?;
    stdout.flush()?;
    Ok(())
}

pub fn cat(repo: &Repo, path: &str) -> anyhow::Result<()> {
    check_path(path)?;
    match Backend::open(repo)? {
        Backend::Online(api) => stream_from_gateway(&api, path),
        Backend::Offline(store) => runtime()?.block_on(async move {
            let cid = unixfs::resolve(&store, path).await?;
            let mut stream = Box::pin(unixfs::cat(store, cid));
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk?).context("cannot write to stdout")?;
            }
            stdout.flush()?;
            Ok(())
        }),
    }
}

/// `cat --core`: the private object, decrypted by the running node and streamed from its API.
pub fn cat_private(repo: &Repo, path: &str, core: &str) -> anyhow::Result<()> {
    let cid = content::parse_cid(path)?;
    let api = needs_running_node(repo)?;
    let mut reader = api.private_get(core, &cid.to_string())?;
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut reader, &mut stdout).context("cannot read the private object or write it to stdout")?;
    stdout.flush()?;
    Ok(())
}

/// Refuses a path whose CID does not parse, before anything else happens.
fn check_path(path: &str) -> anyhow::Result<()> {
    let first = path.trim_start_matches("/ipfs/").split('/').next().unwrap_or("");
    content::parse_cid(first).map(|_| ())
}

pub fn get(repo: &Repo, path: &str, output: Option<PathBuf>, core: Option<&str>) -> anyhow::Result<()> {
    check_path(path)?;
    let default_name = path.trim_start_matches("/ipfs/").trim_end_matches('/').rsplit('/').next().unwrap_or("out").to_string();
    let output = absolute(&output.unwrap_or_else(|| PathBuf::from(default_name)))?;
    let backend = match core {
        Some(_) => Backend::Online(needs_running_node(repo)?),
        None => Backend::open(repo)?,
    };
    let report = match backend {
        Backend::Online(api) => {
            let spinner = ProgressBar::new_spinner().with_message(format!("fetching {path}"));
            spinner.enable_steady_tick(Duration::from_millis(120));
            let mut params = json!({ "path": path, "output": output });
            if let Some(core) = core {
                params["core"] = json!(core);
            }
            let result = api.call("content_get", params);
            spinner.finish_and_clear();
            result?
        }
        Backend::Offline(store) => runtime()?.block_on(async {
            let cid = unixfs::resolve(&store, path).await?;
            let r = unixfs::get(&store, cid, &output).await?;
            Ok::<_, anyhow::Error>(json!({ "files": r.files, "directories": r.directories, "bytes": r.bytes }))
        })?,
    };
    eprintln!(
        "saved {} to {} ({} files, {} directories, {} bytes)",
        path,
        output.display(),
        report["files"],
        report["directories"],
        report["bytes"]
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Pin a CID (recursive by default: the whole DAG, fetched if needed).
    Add {
        cid: String,
        /// Pin only this block.
        #[arg(long)]
        direct: bool,
    },
    /// Remove a pin.
    Rm { cid: String },
    /// List pins.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub fn pin(repo: &Repo, command: PinCommand) -> anyhow::Result<()> {
    let backend = Backend::open(repo)?;
    match command {
        PinCommand::Add { cid, direct } => {
            let cid = content::parse_cid(&cid)?;
            match backend {
                Backend::Online(api) => {
                    api.call("pin_add", json!({ "cid": cid.to_string(), "recursive": !direct }))?;
                }
                Backend::Offline(store) => {
                    runtime()?.block_on(content::pin_add(&store, &store, cid, !direct))?;
                }
            }
            println!("pinned {cid} {}", if direct { "direct" } else { "recursively" });
        }
        PinCommand::Rm { cid } => {
            let cid = content::parse_cid(&cid)?;
            match backend {
                Backend::Online(api) => {
                    api.call("pin_rm", json!({ "cid": cid.to_string() }))?;
                }
                Backend::Offline(store) => content::pin_rm(&store, cid)?,
            }
            println!("unpinned {cid}");
        }
        PinCommand::Ls { json } => {
            let pins: Vec<content::PinEntry> = match backend {
                Backend::Online(api) => serde_json::from_value(api.call("pin_ls", Value::Null)?)?,
                Backend::Offline(store) => content::pin_ls(&store)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&pins)?);
            } else {
                for pin in pins {
                    println!("{} {}", pin.cid, serde_json::to_value(pin.kind)?.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

pub fn gc(repo: &Repo) -> anyhow::Result<()> {
    let summary: content::GcSummary = match Backend::open(repo)? {
        Backend::Online(api) => serde_json::from_value(api.call("repo_gc", Value::Null)?)?,
        Backend::Offline(store) => content::gc(&store)?,
    };
    println!("removed {} blocks, kept {}", summary.removed, summary.kept);
    if summary.missing > 0 {
        eprintln!("warning: {} blocks reached by recursive pins are missing", summary.missing);
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum DagCommand {
    /// Write the DAG under a CID to stdout as a CAR v1 file.
    Export { cid: String },
    /// Import a CAR v1 file (every block verified) and pin its roots.
    Import { file: PathBuf },
}

pub fn dag(repo: &Repo, command: DagCommand) -> anyhow::Result<()> {
    match command {
        DagCommand::Export { cid } => {
            let cid = content::parse_cid(&cid)?;
            match Backend::open(repo)? {
                Backend::Online(api) => stream_from_gateway(&api, &format!("{cid}?format=car")),
                Backend::Offline(store) => {
                    let stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
                    car::export_car(&store, cid, stdout)?;
                    Ok(())
                }
            }
        }
        DagCommand::Import { file } => {
            let path = absolute(&file)?;
            let imported: content::CarImported = match Backend::open(repo)? {
                Backend::Online(api) => serde_json::from_value(api.call("dag_import", json!({ "path": path }))?)?,
                Backend::Offline(store) => content::dag_import(&store, &path)?,
            };
            for root in &imported.roots {
                println!("pinned root {root}");
            }
            eprintln!("imported {} blocks ({} bytes)", imported.blocks, imported.bytes);
            Ok(())
        }
    }
}
