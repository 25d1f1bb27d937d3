//! Content operations shared by the API (a running node) and the CLI (offline, straight on
//! the repo when no node runs): add, pin, gc, CAR import and export.
//!
//! Adding and garbage collection exclude each other through [`GcLock`]: blocks of an add that
//! is not pinned yet must not be swept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cid::Cid;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use kubelt_protocol::car;
use kubelt_protocol::node::fetch_dag;
use kubelt_protocol::store::{PinKind, Store};
use kubelt_protocol::unixfs::{self, BlockSource, ImportOptions};

/// Blocks fetched at once when a whole DAG is wanted.
pub const FETCH_PARALLELISM: usize = 64;

/// Held shared by adds and pins, exclusively by GC.
pub type GcLock = Arc<RwLock<()>>;

/// What to add and how, like `ipfs add` flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddRequest {
    pub path: PathBuf,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default)]
    pub cid_version: u8,
    #[serde(default)]
    pub hidden: bool,
    #[serde(default = "yes")]
    pub pin: bool,
    /// Encrypt the file under this core's data key (a private object, `kbobj1`): the CID is the
    /// ciphertext's. Needs a running node that writes the core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core: Option<String>,
}

fn yes() -> bool {
    true
}

/// What an add produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Added {
    pub cid: String,
    pub size: u64,
    pub name: String,
}

impl AddRequest {
    pub fn import_options(&self) -> anyhow::Result<ImportOptions> {
        let mut opts = match self.cid_version {
            0 => ImportOptions::default(),
            1 => ImportOptions::cid_v1(),
            v => anyhow::bail!("unknown CID version {v} (use 0 or 1)"),
        };
        opts.include_hidden = self.hidden;
        Ok(opts)
    }
}

/// Imports a file or tree and pins its root (recursively). Blocking.
pub fn add(store: &Store, request: &AddRequest, progress: &mut dyn FnMut(u64)) -> anyhow::Result<Added> {
    let opts = request.import_options()?;
    let path = &request.path;
    let imported = unixfs::add_path(store, path, request.recursive, &opts, progress)?;
    if request.pin {
        store.pin(&imported.cid, PinKind::Recursive)?;
    } else {
        store.flush()?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    Ok(Added { cid: imported.cid.to_string(), size: imported.size, name })
}

/// Parses a CID given by a user, with a message that says what was wrong.
pub fn parse_cid(text: &str) -> anyhow::Result<Cid> {
    let trimmed = text.trim().trim_start_matches("/ipfs/");
    Cid::try_from(trimmed).map_err(|e| anyhow::anyhow!("invalid CID '{text}': {e}"))
}

/// One pin as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinEntry {
    pub cid: String,
    #[serde(rename = "type")]
    pub kind: PinKind,
}

/// Pins `cid`: a recursive pin first makes sure the whole DAG is stored (fetching it through
/// `source`), a direct pin the one block.
pub async fn pin_add<S: BlockSource + Clone>(store: &Store, source: &S, cid: Cid, recursive: bool) -> anyhow::Result<PinEntry> {
    if recursive {
        fetch_dag(source, cid, FETCH_PARALLELISM).await.with_context(|| format!("cannot fetch the DAG of {cid}"))?;
    } else {
        source.get(cid).await.with_context(|| format!("cannot fetch {cid}"))?;
    }
    let kind = if recursive { PinKind::Recursive } else { PinKind::Direct };
    store.pin(&cid, kind)?;
    Ok(PinEntry { cid: cid.to_string(), kind })
}

pub fn pin_rm(store: &Store, cid: Cid) -> anyhow::Result<()> {
    if !store.unpin(&cid)? {
        anyhow::bail!("{cid} is not pinned");
    }
    Ok(())
}

pub fn pin_ls(store: &Store) -> anyhow::Result<Vec<PinEntry>> {
    Ok(store.pins()?.into_iter().map(|p| PinEntry { cid: p.cid.to_string(), kind: p.kind }).collect())
}

/// What a GC run removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcSummary {
    pub removed: u64,
    pub kept: u64,
    pub missing: u64,
}

pub fn gc(store: &Store) -> anyhow::Result<GcSummary> {
    let report = unixfs::gc(store)?;
    Ok(GcSummary { removed: report.removed, kept: report.kept, missing: report.missing })
}

/// What a CAR import stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarImported {
    pub roots: Vec<String>,
    pub blocks: u64,
    pub bytes: u64,
}

/// Imports a CAR file (every block verified) and pins its roots once all of it was read.
/// Blocking.
pub fn dag_import(store: &Store, path: &Path) -> anyhow::Result<CarImported> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let summary = car::import_car(store, file).with_context(|| format!("cannot import {}", path.display()))?;
    for root in &summary.roots {
        store.pin(root, PinKind::Recursive)?;
    }
    Ok(CarImported {
        roots: summary.roots.iter().map(ToString::to_string).collect(),
        blocks: summary.blocks,
        bytes: summary.bytes,
    })
}
