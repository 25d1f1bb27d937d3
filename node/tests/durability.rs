//! Acknowledged writes are on disk before the acknowledgement: shown by the order of the node's
//! own system calls, recorded with `strace`.
//!
//! A kill -9 keeps the page cache, so a node that forgot an fsync still finds its data after a
//! restart; and a killed writer would recover its writes from peers anyway. So each test here
//! runs the *only* holder of the data under `strace -f -yy -xx`, performs one write through the
//! CLI, kills the node with SIGKILL and reads the trace: the bytes of the write must have reached
//! a file that was fsynced before the HTTP response left for the client. `-yy` names the file or
//! TCP connection behind each fd as it was at the moment of the call (so a reused fd number, or
//! a call from another thread, is never confused with another file), `-xx` prints every byte in
//! hex, so the data of each call can be searched exactly.
//!
//! What the design notes promise (docs/design-notes.md, "Storage"):
//! - a core change is written with a synced batch before the write is acknowledged: the WAL
//!   write that carries the change, then an fdatasync of that WAL, then the response;
//! - large blocks go to pack files, and `Store::pin` syncs them before it writes the synced pin:
//!   the file's chunks reach a pack file, which is fsynced (and its directory too) before the
//!   pin's WAL write; the root block and the chunks' locations are logged in the WAL, whose
//!   fdatasync after the pin's write precedes the response.
//!
//! Without strace (or where ptrace is not allowed) these tests fail, saying how to install it,
//! unless `KUBELT_SKIP_STRACE=1` skips them on purpose (shown, and counted by scripts/test.sh).

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use common::{delegate, kubelt_ok, skip_or_fail, TestNode};

const SKIP_STRACE: &str = "KUBELT_SKIP_STRACE";

#[test]
fn a_core_write_is_fsynced_before_it_is_acknowledged() -> anyhow::Result<()> {
    let test = "a_core_write_is_fsynced_before_it_is_acknowledged";
    if !strace_usable(test)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("owner.key");
    let address = kubelt_ok(dir.path(), &["core", "dev-wallet", "--create", path_str(&key)?])?;
    let traced = TracedNode::start(dir.path(), "n")?;
    delegate(&traced.node, &address, &key)?;

    // A value found nowhere else, to pick out the WAL write that carries this change.
    let marker = format!("durable-{}", std::process::id());
    kubelt_ok(&traced.node.repo, &["core", "set", &address, "app", "durable", &format!("\"{marker}\"")])?;
    let answered = now();
    let (repo, calls) = traced.kill9()?;

    let db = db_dir(&repo)?;
    let request = request(&calls, "core_set")?;
    let response = response(&calls, request)?;
    let wal_write = within(&calls, request.end, response.start)
        .find(|c| c.is_write() && is_wal(&db, &c.target) && contains(&c.data, marker.as_bytes()))
        .context("no WAL write between the core_set request and its response carries the change")?;
    let wal_sync = synced_between(&calls, &wal_write.target, wal_write.end, response.start).with_context(|| {
        format!("the WAL write of the change (line {}, {}) was not fsynced before the response (line {})", wal_write.start, wal_write.target, response.start)
    })?;
    assert!(response.time <= answered, "the response found in the trace ({}) is later than the CLI's answer ({answered})", response.time);
    eprintln!(
        "{}",
        timeline(&[
            ("core_set request read", request),
            ("WAL write of the change", wal_write),
            ("WAL fdatasync", wal_sync),
            ("HTTP response written", response),
        ], answered)
    );

    // The page cache kept everything, so this alone proves nothing; the order above is the proof.
    let node = TestNode::start_on(&repo, "n-again", &[])?;
    assert_eq!(kubelt_ok(&node.repo, &["core", "get", &address, "app", "durable"])?, format!("\"{marker}\""));
    Ok(())
}

#[test]
fn an_added_file_is_fsynced_before_its_pin_is_acknowledged() -> anyhow::Result<()> {
    let test = "an_added_file_is_fsynced_before_its_pin_is_acknowledged";
    if !strace_usable(test)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Text with a marker on every line, so that every block (and any prefix of a file write that
    // strace shows) carries it; numbered lines, so that no two chunks are the same block.
    let marker = format!("durable-block-{}", std::process::id());
    let mut content = String::new();
    for line in 0..20_000 {
        writeln!(content, "{marker} {line:08}")?;
    }
    let file = dir.path().join("only-here.txt");
    std::fs::write(&file, &content)?;
    let traced = TracedNode::start(dir.path(), "n")?;

    let cid = kubelt_ok(&traced.node.repo, &["add", "--quiet", path_str(&file)?])?;
    let answered = now();
    let (repo, calls) = traced.kill9()?;

    let db = db_dir(&repo)?;
    let root = cid::Cid::try_from(cid.as_str())?.to_bytes();
    let request = request(&calls, "content_add")?;
    let response = response(&calls, request)?;
    // The root's key is its multihash, which for a CIDv0 is also the pin's key: the root block's
    // own (logged) write comes first, the pin is the last write that names it.
    let pin_write = within(&calls, request.end, response.start)
        .filter(|c| c.is_write() && is_wal(&db, &c.target) && contains(&c.data, &root))
        .last()
        .context("no WAL write between the content_add request and its response carries the pin of the root")?;
    let before_pin: Vec<&Call> = within(&calls, request.end, pin_write.start).collect();
    // Every pack file written before the pin must be synced after its last write and before the
    // pin's WAL write: the file's chunks are there.
    let packs = db.join("packs");
    let mut pack_files: Vec<&str> = before_pin.iter().filter(|c| c.is_write() && is_in(&packs, &c.target)).map(|c| c.target.as_str()).collect();
    pack_files.sort_unstable();
    pack_files.dedup();
    let mut steps = vec![("content_add request read", request)];
    let mut blocks_reached_a_file = false;
    for pack_file in &pack_files {
        let writes: Vec<&Call> = before_pin.iter().copied().filter(|c| c.is_write() && c.target == *pack_file).collect();
        blocks_reached_a_file |= writes.iter().any(|c| contains(&c.data, marker.as_bytes()));
        let (first_write, last_write) = (*writes.first().context("a pack file without writes")?, *writes.last().context("a pack file without writes")?);
        let sync = synced_between(&calls, pack_file, last_write.end, pin_write.start)
            .with_context(|| format!("{pack_file} was written (last at line {}) but not fsynced before the pin's WAL write (line {})", last_write.start, pin_write.start))?;
        // The new file counts only once the directory that names it is synced.
        let dir_sync = synced_between(&calls, path_str(&packs)?, first_write.start, pin_write.start)
            .with_context(|| format!("the pack directory (naming {pack_file}) was not fsynced before the pin's WAL write"))?;
        steps.extend([("last write of a pack file", last_write), ("its fdatasync", sync), ("pack directory fsync", dir_sync)]);
    }
    assert!(blocks_reached_a_file, "no pack file written before the pin holds the file's blocks (pack files written: {pack_files:?})");
    // The rest (the root block, the chunks' locations) went to the WAL, logged: every WAL file
    // written since the request is synced after its last write and before the response.
    let mut wal_files: Vec<&str> = within(&calls, request.end, response.start).filter(|c| c.is_write() && is_wal(&db, &c.target)).map(|c| c.target.as_str()).collect();
    wal_files.sort_unstable();
    wal_files.dedup();
    for wal_file in &wal_files {
        let last_write = within(&calls, request.end, response.start).filter(|c| c.is_write() && c.target == *wal_file).last().context("a WAL without writes")?;
        synced_between(&calls, wal_file, last_write.end, response.start)
            .with_context(|| format!("{wal_file} was written (last at line {}) but not fsynced before the response (line {})", last_write.start, response.start))?;
    }
    let pin_sync = synced_between(&calls, &pin_write.target, pin_write.end, response.start)
        .with_context(|| format!("the pin's WAL write (line {}) was not fsynced before the response (line {})", pin_write.start, response.start))?;
    assert!(response.time <= answered, "the response found in the trace ({}) is later than the CLI's answer ({answered})", response.time);
    steps.extend([("WAL write of the pin", pin_write), ("WAL fdatasync", pin_sync), ("HTTP response written", response)]);
    eprintln!("{}", timeline(&steps, answered));

    let node = TestNode::start_on(&repo, "n-again", &[])?;
    let out = common::kubelt(&node.repo, &["cat", &cid])?;
    assert!(out.stdout == content.as_bytes(), "the file is not back after the restart: {}", common::describe(&out));
    let pins = kubelt_ok(&node.repo, &["pin", "ls"])?;
    assert!(pins.contains(&cid), "the pin is not back after the restart: {pins}");
    Ok(())
}

/// Whether strace can trace here; `false` when the test is skipped on purpose.
fn strace_usable(test: &str) -> anyhow::Result<bool> {
    let problem = match Command::new("strace").args(["-f", "-o", "/dev/null", "true"]).output() {
        Ok(out) if out.status.success() => return Ok(true),
        Ok(out) => format!("strace cannot trace here (is ptrace allowed?): {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("strace is not installed ({e})"),
    };
    skip_or_fail(SKIP_STRACE, test, &problem, "Install it with `scripts/setup.sh --test` (apt package strace) and allow ptrace")?;
    Ok(false)
}

/// A node running under strace, the only holder of its data.
struct TracedNode {
    node: TestNode,
    trace: PathBuf,
}

impl TracedNode {
    fn start(dir: &Path, name: &str) -> anyhow::Result<TracedNode> {
        let repo = dir.join(name);
        kubelt_ok(&repo, &["init"])?;
        let trace = dir.join(format!("{name}.strace"));
        let wrapper = [
            "strace",
            "-f",
            "-yy",
            "-xx",
            "-s",
            "4096",
            "-ttt",
            "-e",
            "trace=openat,close,read,recvfrom,write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sync_file_range,rename,sendto,sendmsg",
            "-o",
            path_str(&trace)?,
        ];
        // No peers: nothing can be recovered from another node.
        let node = TestNode::start_wrapped(&repo, name, &wrapper, &["--listen", "/ip4/127.0.0.1/tcp/0"], &[])?;
        Ok(TracedNode { node, trace })
    }

    /// Kills the node itself (not strace) with SIGKILL, waits for strace to write the whole
    /// trace and exit, and returns the repo and the parsed calls.
    fn kill9(mut self) -> anyhow::Result<(PathBuf, Vec<Call>)> {
        let pid = self.node.wrapped_pid()?;
        // SAFETY: kill(2) with the pid of the node this test started; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        common::wait_until("strace to exit after the node was killed", Duration::from_secs(20), || Ok(!self.node.is_running()))?;
        // strace ends the trace with the tracee's death; until that line is there, the trace
        // may not be complete on disk yet.
        let mut text = String::new();
        common::wait_until("strace to finish writing the trace", Duration::from_secs(20), || {
            text = std::fs::read_to_string(&self.trace).with_context(|| format!("no trace at {}", self.trace.display()))?;
            let end = format!("{pid} ");
            Ok(text.lines().any(|l| l.starts_with(&end) && l.ends_with("+++ killed by SIGKILL +++")))
        })?;
        let calls = parse_trace(&text);
        if !calls.iter().any(|c| c.name == "fdatasync" || c.name == "fsync") {
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            bail!(
                "the trace at {} ({} bytes, {} calls) has no fsync at all: was the node traced? Its last lines:\n{}",
                self.trace.display(),
                text.len(),
                calls.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok((self.node.repo.clone(), calls))
    }
}

/// One system call of the trace.
#[derive(Debug)]
struct Call {
    /// Lines of the trace where it entered and returned (the same line unless another thread's
    /// call came in between): strace stops a thread at each, so the lines order causally.
    start: usize,
    end: usize,
    /// When it entered, seconds since the epoch.
    time: f64,
    end_time: f64,
    name: String,
    /// What its first argument's fd was at the time: a path, or `TCP:[local->remote]`.
    target: String,
    /// Every string argument, decoded and concatenated (the first 4096 bytes of each).
    data: Vec<u8>,
    ok: bool,
    /// The process died before the call returned (`= ?`): it was entered, its arguments are
    /// what it was given, but whether it did its work is unknown.
    cut_short: bool,
}

impl Call {
    fn is_write(&self) -> bool {
        self.ok && self.writes()
    }

    /// A write that succeeded or was cut short by the kill. A response the client got is one
    /// of these: under load the node can be killed after the kernel sent the bytes but before
    /// strace saw the call return (`writev(...) = ?`).
    fn may_have_written(&self) -> bool {
        (self.ok || self.cut_short) && self.writes()
    }

    fn writes(&self) -> bool {
        matches!(self.name.as_str(), "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "sendto" | "sendmsg")
    }

    fn is_read(&self) -> bool {
        self.ok && matches!(self.name.as_str(), "read" | "recvfrom")
    }

    fn is_sync(&self) -> bool {
        self.ok && matches!(self.name.as_str(), "fsync" | "fdatasync")
    }
}

/// Parses `strace -f -yy -xx -ttt` output: `PID TIME NAME(ARGS) = RET`, with calls that another
/// thread interrupted split into `... <unfinished ...>` and `<... NAME resumed>...`.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut unfinished: HashMap<&str, (usize, f64, String)> = HashMap::new();
    let mut calls = vec![];
    for (line, text) in text.lines().enumerate() {
        // `PID TIME CALL...`: strace pads the pid column, so short pids are followed by more
        // than one space.
        let Some((pid, after_pid)) = text.split_once(' ') else { continue };
        let Some((time, rest)) = after_pid.trim_start().split_once(' ') else { continue };
        let Ok(time) = time.parse::<f64>() else { continue };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((start, start_time, head)) = unfinished.remove(pid) else { continue };
            let tail = resumed.split_once(" resumed>").map_or("", |(_, tail)| tail);
            calls.extend(finish(start, line, start_time, time, &format!("{head}{tail}")));
        } else if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid, (line, time, head.to_string()));
        } else {
            calls.extend(finish(line, line, time, time, rest));
        }
    }
    calls.sort_by_key(|c| c.start);
    calls
}

/// `NAME(FD<target>, ARGS...) = RET` into a [`Call`].
fn finish(start: usize, end: usize, time: f64, end_time: f64, text: &str) -> Option<Call> {
    let (name, args) = text.split_once('(')?;
    let (args, ret) = args.rsplit_once(") = ")?;
    let ok = !ret.starts_with('-') && !ret.starts_with('?');
    let cut_short = ret.starts_with('?');
    // The target ends at the first '>' that ends the argument (`TCP:[a->b]` has one inside).
    let mut target = String::new();
    if let Some(open) = args.find('<').filter(|open| args[..*open].bytes().all(|b| b.is_ascii_digit())) {
        let bytes = args.as_bytes();
        let close = (open + 1..bytes.len()).find(|&i| bytes[i] == b'>' && matches!(bytes.get(i + 1), None | Some(b',') | Some(b')')))?;
        target = String::from_utf8_lossy(&unescape(&args[open + 1..close])).into_owned();
    }
    let mut data = vec![];
    let mut quoted = args.split('"');
    quoted.next();
    while let (Some(string), _) = (quoted.next(), quoted.next()) {
        data.extend(unescape(string));
    }
    Some(Call { start, end, time, end_time, name: name.to_string(), target, data, ok, cut_short })
}

/// strace's escapes (`\xNN` with -xx, plus the C ones) back into bytes.
fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            let (byte, used) = match bytes[i + 1] {
                b'x' => (std::str::from_utf8(bytes.get(i + 2..i + 4).unwrap_or_default()).ok().and_then(|h| u8::from_str_radix(h, 16).ok()), 4),
                b'n' => (Some(b'\n'), 2),
                b'r' => (Some(b'\r'), 2),
                b't' => (Some(b'\t'), 2),
                other => (Some(other), 2),
            };
            if let Some(byte) = byte {
                out.push(byte);
                i += used;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The first read of a JSON-RPC request for `method` on an API connection.
fn request<'a>(calls: &'a [Call], method: &str) -> anyhow::Result<&'a Call> {
    let needle = format!("\"method\":\"{method}\"");
    calls
        .iter()
        .find(|c| c.is_read() && c.target.starts_with("TCP:") && contains(&c.data, needle.as_bytes()))
        .with_context(|| format!("no {method} request read from a TCP connection in the trace"))
}

/// The first JSON-RPC response written on the connection the request came in on, after it (the
/// CLI got it, so a write the kill cut short counts).
fn response<'a>(calls: &'a [Call], request: &Call) -> anyhow::Result<&'a Call> {
    calls
        .iter()
        .find(|c| c.start > request.end && c.may_have_written() && c.target == request.target && contains(&c.data, b"\"jsonrpc\""))
        .with_context(|| format!("no JSON-RPC response on {} after the request (line {})", request.target, request.start))
}

/// The calls that entered after line `after` and before line `before`.
fn within(calls: &[Call], after: usize, before: usize) -> impl Iterator<Item = &Call> {
    calls.iter().filter(move |c| c.start > after && c.start < before)
}

/// A sync of `target` that entered after line `after` and returned before line `before`.
fn synced_between<'a>(calls: &'a [Call], target: &str, after: usize, before: usize) -> Option<&'a Call> {
    calls.iter().find(|c| c.is_sync() && c.target == target && c.start > after && c.end < before)
}

/// The repo's RocksDB directory, as strace names it (symlinks resolved).
fn db_dir(repo: &Path) -> anyhow::Result<PathBuf> {
    let db = repo.join("datastore");
    db.canonicalize().with_context(|| format!("no database at {}", db.display()))
}

fn is_in(db: &Path, target: &str) -> bool {
    Path::new(target).parent() == Some(db)
}

/// A RocksDB write-ahead log of the database.
fn is_wal(db: &Path, target: &str) -> bool {
    is_in(db, target) && target.ends_with(".log")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The steps in trace order, with their times, for the test's output.
fn timeline(steps: &[(&str, &Call)], answered: f64) -> String {
    let mut steps = steps.to_vec();
    steps.sort_by_key(|(_, c)| c.start);
    let mut out = String::from("order in the trace:\n");
    for (what, call) in steps {
        let _ = writeln!(
            out,
            "  line {:>6}  {:.6}..{:.6}  {what}: {}({})",
            call.start, call.time, call.end_time, call.name, call.target
        );
    }
    let _ = writeln!(out, "  CLI got its answer at {answered:.6}");
    out
}

#[test]
fn a_response_the_kill_cut_short_is_still_the_response() {
    let text = "10 1.000000 recvfrom(22<TCP:[127.0.0.1:1->127.0.0.1:2]>, \"\\x7b\\x22\\x6d\\x65\\x74\\x68\\x6f\\x64\\x22\\x3a\\x22\\x78\\x22\", 8192, 0, NULL, NULL) = 11\n\
                11 1.000100 fdatasync(8</repo/db/000012.log>) = 0\n\
                10 1.000200 writev(22<TCP:[127.0.0.1:1->127.0.0.1:2]>, [{iov_base=\"\\x22\\x6a\\x73\\x6f\\x6e\\x72\\x70\\x63\\x22\", iov_len=9}], 1) = ?\n\
                10 1.000300 +++ killed by SIGKILL +++\n";
    let calls = parse_trace(text);
    let request = request(&calls, "x").expect("the request is read");
    let response = response(&calls, request).expect("a write cut short by the kill is the response");
    assert_eq!((response.name.as_str(), response.start), ("writev", 2));
    assert!(!response.is_write(), "a write cut short is not known to have written");
    assert!(synced_between(&calls, "/repo/db/000012.log", request.end, response.start).is_some());
}

#[test]
fn the_trace_parser_reads_padded_and_unpadded_pids() {
    let text = "2937  1795934466.785062 fdatasync(12</repo/db/000012.log>) = 0\n\
                123456 1795934466.785070 fsync(13</repo/db>) = 0\n";
    let calls = parse_trace(text);
    assert_eq!(calls.iter().map(|c| (c.name.as_str(), c.target.as_str())).collect::<Vec<_>>(), vec![
        ("fdatasync", "/repo/db/000012.log"),
        ("fsync", "/repo/db"),
    ]);
}
