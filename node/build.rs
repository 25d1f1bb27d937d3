//! Embeds the example apps (`examples/<name>/...` at the top of the workspace) into the binary,
//! so that the app endpoint serves them at `/apps/<name>/...` without reading any file at run
//! time: `$OUT_DIR/apps.rs` holds a table of `(path, bytes)` sorted by path, each file an
//! `include_bytes!` of its absolute path, read by `src/apps.rs`.
//!
//! Only plain names are embedded (`[A-Za-z0-9._-]`, not starting with a dot): a name the
//! server could not ask for, or a hidden file (an editor's swap file), is left out with a
//! warning rather than served under a name nobody chose.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let examples = manifest.join("..").join("examples");
    // A directory here makes cargo rerun this script when any file below it changes.
    println!("cargo:rerun-if-changed={}", examples.display());
    let mut files = Vec::new();
    if examples.is_dir() {
        collect(&examples, "", &mut files);
    }
    files.sort();
    let mut table = String::from("/// The embedded example apps: (path below `examples/`, bytes), sorted by path.\npub static FILES: &[(&str, &[u8])] = &[\n");
    for (name, path) in &files {
        writeln!(table, "    ({name:?}, include_bytes!({:?})),", path.display().to_string()).expect("writing to a String");
    }
    table.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("apps.rs");
    std::fs::write(&out, table).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

/// Adds the files below `dir` (whose path below `examples/` is `prefix`) to `files`.
fn collect(dir: &Path, prefix: &str, files: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !is_plain_name(&name) {
            println!("cargo:warning=not embedding {}: app files have plain names ([A-Za-z0-9._-], no leading dot)", path.display());
            continue;
        }
        let relative = format!("{prefix}{name}");
        // Links are not followed: what is embedded is what lies in the tree.
        let kind = entry.file_type().unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
        if kind.is_dir() {
            collect(&path, &format!("{relative}/"), files);
        } else if kind.is_file() {
            let absolute = path.canonicalize().unwrap_or_else(|e| panic!("cannot resolve {}: {e}", path.display()));
            files.push((relative, absolute));
        }
    }
}

/// The names `src/apps.rs` serves: the same rule on both sides.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}
