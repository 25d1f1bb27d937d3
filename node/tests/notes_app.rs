//! The example notes app (`examples/notes/`, served at `/apps/notes/` on the app endpoint), as a
//! person uses it: in a real browser (headless Chromium driven through chromium-driver by
//! `tests/browser/notes_driver.py` with Selenium), signed in with a wallet whose key only the
//! test holds (eth-account, behind an injected EIP-1193 provider), on two `kubelt run` nodes that
//! hold the same core. Run inside a private network namespace (scripts/test.sh does): the
//! browsers reach nothing but loopback.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` and the Python packages `selenium`
//! and `eth-account` (`scripts/setup.sh --test`); `KUBELT_SKIP_BROWSER=1` skips the browser test
//! on purpose, counted as skipped by scripts/test.sh. `KUBELT_UPDATE_SCREENSHOT=1` copies the
//! screenshot the test takes to `docs/notes-app.png`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{bail, Context};
use common::{free_port, wait_until, TestNode};
use serde_json::{json, Value};

const TEST: &str = "notes_app::two_browsers_on_two_nodes_see_each_others_notes_live_and_edits_made_offline_are_sent_when_the_node_is_back";

/// Sends `GET path` as is (no client normalizes it) and returns the status, headers and body.
fn raw_get(url: &str, path: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    Ok((status, head, answer[split + 4..].to_vec()))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn the_app_endpoint_serves_the_embedded_apps_and_refuses_paths_that_could_escape() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "a", &[])?;
    let app = node.app_url().to_string();

    for (path, file, kind) in [
        ("/apps/notes/", "notes/index.html", "text/html; charset=utf-8"),
        ("/apps/notes/index.html", "notes/index.html", "text/html; charset=utf-8"),
        ("/apps/notes/app.js", "notes/app.js", "text/javascript; charset=utf-8"),
        ("/apps/notes/style.css", "notes/style.css", "text/css; charset=utf-8"),
        ("/apps/notes/sw.js", "notes/sw.js", "text/javascript; charset=utf-8"),
    ] {
        let (status, head, body) = raw_get(&app, path)?;
        assert_eq!(status, 200, "{path}: {head}");
        assert_eq!(header(&head, "content-type"), Some(kind), "{path}: {head}");
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"), "{path}: {head}");
        assert!(header(&head, "content-security-policy").is_some_and(|csp| csp.contains("default-src 'self'")), "{path}: {head}");
        // What the binary serves is the file of the source tree, byte for byte.
        assert_eq!(body, std::fs::read(examples_dir().join(file))?, "{path} differs from examples/{file}");
    }
    let (status, head, _) = raw_get(&app, "/apps/notes")?;
    assert_eq!((status, header(&head, "location")), (308, Some("notes/")), "{head}");

    // Paths that could leave the apps are refused before any lookup; none reaches a file.
    for path in [
        "/apps/notes/../../Cargo.toml",
        "/apps/../node/build.rs",
        "/apps/notes/./app.js",
        "/apps/notes/%2e%2e/%2e%2e/Cargo.toml",
        "/apps/notes%2Fapp.js",
        "/apps/notes/..%2F..%2FCargo.toml",
        "/apps/notes/%2E%2E%5C%2E%2E%5CCargo.toml",
        "/apps/notes/..\\..\\Cargo.toml",
    ] {
        let (status, head, body) = raw_get(&app, path)?;
        assert_eq!(status, 400, "{path} was not refused: {head}");
        assert!(!String::from_utf8_lossy(&body).contains("[workspace]"), "{path} served a file");
    }
    for path in ["/apps/", "/apps/nope/", "/apps/notes/nope.js", "/apps/notes/.hidden", "/apps/notes//app.js", "/apps/notes/app.js/"] {
        let (status, head, _) = raw_get(&app, path)?;
        assert_eq!(status, 404, "{path}: {head}");
    }

    // The apps are only on the app endpoint; the admin API is not reachable from their origin.
    let (status, head, _) = raw_get(node.api_url(), "/apps/notes/")?;
    assert_ne!(status, 200, "the admin port serves the apps: {head}");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "node_id"}).to_string();
    let reply: Value = match ureq::post(&app).set("Origin", app.trim_end_matches('/')).set("Content-Type", "application/json").send_string(&body) {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response.into_json()?,
        Err(e) => return Err(e.into()),
    };
    assert_eq!(reply["error"]["code"], -32601, "{reply}");
    Ok(())
}

/// The Python driver of the browsers (tests/browser/notes_driver.py), one JSON line a command.
struct Browsers {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
    log: PathBuf,
}

impl Browsers {
    fn start(dir: &Path) -> anyhow::Result<Browsers> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/notes_driver.py");
        let log = dir.join("driver.log");
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot run python3 {}", script.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (sender, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Browsers { child, stdin, replies, log })
    }

    /// Runs a command (`timeout` is how long the driver itself may wait) and returns its result.
    fn run(&mut self, command: Value, timeout: Duration) -> anyhow::Result<Value> {
        let stdin = self.stdin.as_mut().context("the driver's input is closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        // Starting a browser or a step's own wait comes on top of the command's timeout.
        let line = self.replies.recv_timeout(timeout + Duration::from_secs(60)).map_err(|e| {
            anyhow::anyhow!("no answer from the browser driver to {command} ({e}); its log:\n{}", self.log())
        })?;
        let reply: Value = serde_json::from_str(&line).with_context(|| format!("the driver answered {line:?}"))?;
        match reply.get("error") {
            Some(error) => bail!("{} failed: {}\ndriver log:\n{}", command["cmd"], error.as_str().unwrap_or_default(), self.log()),
            None => Ok(reply["ok"].clone()),
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Browsers {
    fn drop(&mut self) {
        // End of input: the driver quits its browsers (and their chromedriver) and exits.
        drop(self.stdin.take());
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why the browser test cannot run here, if it cannot.
fn browser_missing() -> Option<String> {
    let chromium = std::env::var("KUBELT_CHROMIUM").unwrap_or_else(|_| "/usr/lib/chromium/chromium".into());
    let chromedriver = std::env::var("KUBELT_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    for (path, package) in [(chromium, "chromium"), (chromedriver, "chromium-driver")] {
        if !Path::new(&path).exists() {
            return Some(format!("{path} is missing (Debian package {package})"));
        }
    }
    let imports = Command::new("python3").args(["-c", "import selenium, eth_account"]).output();
    match imports {
        Ok(out) if out.status.success() => None,
        _ => Some("the Python packages selenium and eth-account are missing".into()),
    }
}

/// A note as the core holds it.
fn note_in(node: &TestNode, address: &str, id: &str) -> anyhow::Result<Value> {
    node.call("core_get", json!([address, "notes", id]))
}

#[test]
fn two_browsers_on_two_nodes_see_each_others_notes_live_and_edits_made_offline_are_sent_when_the_node_is_back() -> anyhow::Result<()> {
    let skip = std::env::var("KUBELT_SKIP_BROWSER").is_ok_and(|v| v == "1");
    if let Some(reason) = browser_missing() {
        return common::skip_or_fail("KUBELT_SKIP_BROWSER", TEST, &reason, "run scripts/setup.sh --test");
    }
    if skip {
        return common::skip_or_fail("KUBELT_SKIP_BROWSER", TEST, "asked to skip the browser test", "");
    }
    let dir = tempfile::tempdir()?;
    let mut browsers = Browsers::start(dir.path())?;
    let short = Duration::from_secs(30);
    let long = Duration::from_secs(90);
    let address = browsers.run(json!({"cmd": "wallet"}), short)?["address"].as_str().context("no address")?.to_string();

    // Node A keeps its ports across its restart: the page's origin is its app endpoint.
    let repo_a = dir.path().join("a");
    common::kubelt_ok(&repo_a, &["init"])?;
    let (p2p_port, app_port) = (free_port()?, free_port()?);
    let listen_a = format!("/ip4/127.0.0.1/tcp/{p2p_port}");
    let app_a = format!("127.0.0.1:{app_port}");
    let mut a = TestNode::start_with(&repo_a, "a", &["--listen", &listen_a], &["--owner", &address, "--app-api", &app_a])?;
    let b = TestNode::start(dir.path(), "b", &["--owner", &address, "--peer", &a.tcp_addr()])?;
    assert_eq!(a.app_url(), format!("http://{app_a}/"));

    // Each browser signs in on its own node; the wallet checks the message with the
    // independent EIP-4361 parser before it signs (notes_driver.py).
    browsers.run(json!({"cmd": "open", "browser": "one", "url": format!("{}apps/notes/", a.app_url())}), short)?;
    browsers.run(json!({"cmd": "open", "browser": "two", "url": format!("{}apps/notes/", b.app_url())}), short)?;
    let signed = browsers.run(json!({"cmd": "sign_in", "browser": "one", "timeout": 30}), short)?;
    assert_eq!(signed["domain"], app_a.as_str(), "{signed}");
    assert_eq!(signed["uri"], format!("urn:kubelt:peer:{}", a.peer_id), "{signed}");
    browsers.run(json!({"cmd": "sign_in", "browser": "two", "timeout": 30}), short)?;
    for browser in ["one", "two"] {
        browsers.run(json!({"cmd": "wait_status", "browser": browser, "state": "online", "queued": 0, "timeout": 30}), short)?;
    }
    // From the app's origin, the admin API does not exist.
    let admin = browsers.run(json!({"cmd": "call", "browser": "one", "method": "core_ls", "params": []}), short)?;
    assert_eq!(admin["error"]["code"], -32601, "{admin}");

    // Both replicas must see each other on the core's topic before a write can travel.
    for node in [&a, &b] {
        wait_until("the two replicas to meet", Duration::from_secs(60), || {
            let cores = node.call("core_ls", Value::Null)?;
            Ok(cores.as_array().into_iter().flatten().any(|c| c["address"] == address && c["replicas"].as_u64().unwrap_or(0) >= 1))
        })?;
    }

    // A note made in one browser shows in the other, on the other node, without a reload.
    let made = browsers.run(json!({"cmd": "new_note", "browser": "one", "title": "Groceries", "body": "Milk, eggs"}), short)?;
    let groceries = made["id"].as_str().context("no note id")?.to_string();
    let seen = browsers.run(json!({"cmd": "wait_note", "browser": "two", "id": groceries, "title": "Groceries", "body": "Milk, eggs", "timeout": 60}), long)?;
    eprintln!("a note made on node A showed on node B's page after {} s", seen["seconds"]);
    assert_eq!(note_in(&b, &address, &groceries)?["body"], "Milk, eggs", "node B's core holds the note");
    // And back: an edit in the second browser shows in the first.
    let made = browsers.run(json!({"cmd": "new_note", "browser": "two", "title": "Weekend", "body": "Bike to the lake, bring a map"}), short)?;
    let weekend = made["id"].as_str().context("no note id")?.to_string();
    browsers.run(json!({"cmd": "edit_note", "browser": "two", "id": groceries, "body": "Milk, eggs, coffee"}), short)?;
    browsers.run(json!({"cmd": "wait_note", "browser": "one", "id": weekend, "title": "Weekend", "body": "Bike to the lake, bring a map", "timeout": 60}), long)?;
    browsers.run(json!({"cmd": "wait_note", "browser": "one", "id": groceries, "title": "Groceries", "body": "Milk, eggs, coffee", "timeout": 60}), long)?;

    // Node A goes away: the first browser says so and keeps the edits made meanwhile, also
    // across a reload (its service worker keeps the app's files; localStorage the queue).
    browsers.run(json!({"cmd": "offline_ready", "browser": "one", "timeout": 30}), short)?;
    a.stop()?;
    browsers.run(json!({"cmd": "wait_status", "browser": "one", "state": "offline", "timeout": 30}), short)?;
    browsers.run(json!({"cmd": "edit_note", "browser": "one", "id": groceries, "body": "Milk, eggs, coffee, bread"}), short)?;
    let made = browsers.run(json!({"cmd": "new_note", "browser": "one", "title": "Offline", "body": "Written while the node was down"}), short)?;
    let offline = made["id"].as_str().context("no note id")?.to_string();
    browsers.run(json!({"cmd": "wait_status", "browser": "one", "state": "offline", "queued": 2, "timeout": 10}), short)?;
    std::thread::sleep(Duration::from_secs(2));
    let status = browsers.run(json!({"cmd": "status", "browser": "one"}), short)?;
    assert_eq!((&status["state"], &status["queued"]), (&json!("offline"), &json!(2)), "the queued edits must wait for the node: {status}");
    assert_eq!(note_in(&b, &address, &groceries)?["body"], "Milk, eggs, coffee", "nothing reached the other node");
    browsers.run(json!({"cmd": "reload", "browser": "one"}), short)?;
    browsers.run(json!({"cmd": "wait_status", "browser": "one", "state": "offline", "queued": 2, "timeout": 10}), short)?;
    browsers.run(json!({"cmd": "wait_note", "browser": "one", "id": groceries, "title": "Groceries", "body": "Milk, eggs, coffee, bread", "timeout": 10}), short)?;

    // Node A comes back on the same ports: the page reconnects by itself and sends the queue.
    a = TestNode::start_with(&repo_a, "a", &["--listen", &listen_a], &["--owner", &address, "--app-api", &app_a, "--peer", &b.tcp_addr()])?;
    browsers.run(json!({"cmd": "wait_status", "browser": "one", "state": "online", "queued": 0, "timeout": 60}), long)?;
    assert_eq!(note_in(&a, &address, &groceries)?["body"], "Milk, eggs, coffee, bread");
    assert_eq!(note_in(&a, &address, &offline)?["title"], "Offline");
    // ...and the other browser, on the other node, gets them live.
    browsers.run(json!({"cmd": "wait_note", "browser": "two", "id": offline, "title": "Offline", "body": "Written while the node was down", "timeout": 60}), long)?;
    browsers.run(json!({"cmd": "wait_note", "browser": "two", "id": groceries, "title": "Groceries", "body": "Milk, eggs, coffee, bread", "timeout": 60}), long)?;

    // The picture for the README: the first browser, a note open.
    browsers.run(json!({"cmd": "wait_note", "browser": "one", "id": weekend, "title": "Weekend", "body": "Bike to the lake, bring a map", "timeout": 10}), short)?;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("notes-app.png");
    let taken = browsers.run(json!({"cmd": "screenshot", "browser": "one", "path": shot}), short)?;
    assert!(taken["bytes"].as_u64().unwrap_or(0) > 10_000, "the screenshot is too small to show the app: {taken}");
    eprintln!("screenshot: {}", shot.display());
    if std::env::var("KUBELT_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        std::fs::copy(&shot, Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/notes-app.png"))?;
    }
    browsers.run(json!({"cmd": "quit"}), short)?;
    Ok(())
}
