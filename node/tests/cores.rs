//! Cores through the `kubelt` binary, where only a process shows it: acknowledged writes
//! survive kill -9, a revocation made with the CLI makes the others refuse the revoked node's
//! writes, bad input from the command line is refused. (Replication between nodes, the DHT,
//! partitions and forged changes are tested in one process: `protocol/tests/`.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::{delegate, describe, free_port, kubelt, kubelt_ok, wait_until, TestNode};
use serde_json::{json, Value};

/// A test wallet: a fresh secp256k1 key file, and its address.
fn wallet(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let key = dir.join(format!("{name}.key"));
    let address = kubelt_ok(dir, &["core", "dev-wallet", "--create", key.to_str().unwrap_or_default()])?;
    Ok((key, address))
}

fn heads(node: &TestNode, address: &str) -> anyhow::Result<Value> {
    node.call("core_heads", json!({ "address": address }))
}

fn namespace(node: &TestNode, address: &str, ns: &str) -> anyhow::Result<Value> {
    node.call("core_get", json!({ "address": address, "namespace": ns }))
}

/// Waits until every node has the same heads and the same `app` namespace, and returns it.
fn converged(nodes: &[&TestNode], address: &str, timeout: Duration) -> anyhow::Result<Value> {
    wait_until("the replicas to converge", timeout, || {
        let first = (heads(nodes[0], address)?, namespace(nodes[0], address, "app")?);
        for node in &nodes[1..] {
            if (heads(node, address)?, namespace(node, address, "app")?) != first {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    namespace(nodes[0], address, "app")
}

#[test]
fn an_acknowledged_write_survives_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (key, address) = wallet(dir.path(), "owner")?;
    let mut node = TestNode::start(dir.path(), "n", &[])?;
    delegate(&node, &address, &key)?;
    let out = kubelt(&node.repo, &["core", "set", &address, "app", "durable", "{\"v\": 42}"])?;
    assert!(out.status.success(), "{}", describe(&out));
    node.kill9()?;
    let node = TestNode::start_on(&node.repo.clone(), "n-again", &[])?;
    assert_eq!(kubelt_ok(&node.repo, &["core", "get", &address, "app", "durable/v"])?, "42");
    let listed: Value = serde_json::from_str(&kubelt_ok(&node.repo, &["core", "ls", "--json"])?)?;
    assert_eq!(listed[0]["writable"], true, "the delegation survived too");
    Ok(())
}

#[test]
fn bad_core_input_is_refused_clearly_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (key, address) = wallet(dir.path(), "owner")?;
    let (other_key, _) = wallet(dir.path(), "someone-else")?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &[])?;
    let fails = |node: &TestNode, args: &[&str], expected: &str| -> anyhow::Result<()> {
        let out = kubelt(&node.repo, args)?;
        assert!(!out.status.success(), "{args:?} succeeded: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: expected '{expected}' in: {}", describe(&out));
        Ok(())
    };
    fails(&a, &["core", "follow", "0x1234"], "invalid address")?;
    fails(&a, &["core", "delegate", "not-an-address"], "invalid address")?;

    let message = kubelt_ok(&a.repo, &["core", "delegate", &address])?;
    let file = dir.path().join("a.siwe");
    std::fs::write(&file, &message)?;
    let file = file.to_str().unwrap_or_default();
    fails(&a, &["core", "submit", "--message-file", file, "--signature", "0xnothex"], "hex")?;
    fails(&a, &["core", "submit", "--message-file", file, "--signature", "0x1234"], "65")?;
    // Signed by a wallet that is not the core's owner.
    fails(&a, &["core", "submit", "--message-file", file, "--sign-with", other_key.to_str().unwrap_or_default()], "signed by")?;
    // A valid delegation, but for another node.
    fails(&b, &["core", "submit", "--message-file", file, "--sign-with", key.to_str().unwrap_or_default()], "not this node")?;
    fails(&a, &["core", "set", &address, "app", "x", "1"], "does not hold")?;

    for node in [&a, &b] {
        assert_eq!(node.call("core_ls", Value::Null)?, json!([]), "nothing was stored on {}", node.name);
    }
    // The same delegation, correctly signed, on the right node works.
    kubelt_ok(&a.repo, &["core", "submit", "--message-file", file, "--sign-with", key.to_str().unwrap_or_default()])?;
    fails(&a, &["core", "set", &address, "app", "x", "{not json"], "not valid JSON")?;
    kubelt_ok(&a.repo, &["core", "set", &address, "app", "x", "1"])?;
    Ok(())
}

/// `--expires` comes from the user: a count of days that overflows a duration, or an expiry
/// past the year 9999, is a clear error — the API call used to panic and drop the connection.
#[test]
fn core_delegate_with_an_absurd_expiry_fails_clearly_and_the_node_keeps_running() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, address) = wallet(dir.path(), "owner")?;
    let node = TestNode::start(dir.path(), "n", &[])?;
    for (expires, expected) in [("106751991167301d", "year 9999"), ("4000000d", "year 9999"), ("99999999999999999999d", "invalid duration"), ("213503982334601w", "too long")] {
        let out = kubelt(&node.repo, &["core", "delegate", &address, "--expires", expires])?;
        assert!(!out.status.success(), "--expires {expires} succeeded: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "--expires {expires}: expected '{expected}' in: {}", describe(&out));
        assert!(node.call("node_id", Value::Null).is_ok(), "the node stopped answering after --expires {expires}");
    }
    let message = kubelt_ok(&node.repo, &["core", "delegate", &address, "--expires", "3650d"])?;
    assert!(message.contains("Expiration Time: 20"), "{message}");
    Ok(())
}

#[test]
fn core_revoke_from_the_cli_makes_the_others_refuse_the_revoked_node_s_later_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (key, address) = wallet(dir.path(), "owner")?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let start = |name: &str, port: u16, extra: &[&str]| -> anyhow::Result<TestNode> {
        let repo = dir.path().join(name);
        if !repo.exists() {
            kubelt_ok(&repo, &["init"])?;
        }
        TestNode::start_with(&repo, name, &["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")], extra)
    };
    let mut a = start("a", ports[0], &[])?;
    let mut b = start("b", ports[1], &["--peer", &a.tcp_addr()])?;
    let mut c = start("c", ports[2], &["--peer", &a.tcp_addr()])?;
    delegate(&a, &address, &key)?;
    delegate(&b, &address, &key)?;
    kubelt_ok(&c.repo, &["core", "follow", &address])?;
    let get = |node: &TestNode, path: &str| kubelt_ok(&node.repo, &["core", "get", &address, "app", path]);
    kubelt_ok(&b.repo, &["core", "set", &address, "app", "before", "\"kept\""])?;
    converged(&[&a, &b, &c], &address, Duration::from_secs(20))?;

    // The owner revokes b. The message keeps what a holds of b now; b writes once more before
    // the revocation is submitted, and every replica accepts that write for the time being.
    let revocation = kubelt_ok(&a.repo, &["core", "revoke", &address, "--peer", &b.peer_id])?;
    let revocation_file = dir.path().join("revoke-b.txt");
    std::fs::write(&revocation_file, &revocation)?;
    kubelt_ok(&b.repo, &["core", "set", &address, "app", "late", "\"past the kept history\""])?;
    wait_until("c to accept b's late write", Duration::from_secs(20), || Ok(get(&c, "late")? == "\"past the kept history\""))?;
    b.stop()?;
    let out = kubelt_ok(&a.repo, &["core", "submit", "--message-file", revocation_file.to_str().unwrap_or_default(), "--sign-with", key.to_str().unwrap_or_default()])?;
    assert!(out.contains("revocation applied") && out.contains(&b.peer_id), "{out}");
    wait_until("c to drop b's late write", Duration::from_secs(20), || Ok(get(&c, "late")? == "null"))
        .map_err(|e| anyhow::anyhow!("{e}\nlog of c:\n{}", c.log()))?;
    assert_eq!(get(&c, "before")?, "\"kept\"", "what the revocation keeps stays");

    // b, alone and unaware of its revocation, writes again; when the others come back they
    // refuse that write, and b, having learned the revocation from them, drops it too.
    a.stop()?;
    c.stop()?;
    let b2 = start("b", ports[1], &[])?;
    kubelt_ok(&b2.repo, &["core", "set", &address, "app", "after", "\"written after the revocation\""])?;
    let a2 = start("a", ports[0], &[])?;
    let c2 = start("c", ports[2], &[])?;
    let doc = converged(&[&a2, &b2, &c2], &address, Duration::from_secs(40))?;
    assert_eq!(doc, json!({ "before": "kept" }), "only what the revocation kept is left");
    let out = kubelt(&b2.repo, &["core", "set", &address, "app", "again", "1"])?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("revoked"), "{}", describe(&out));
    drop((a, b, c));
    Ok(())
}

/// `core private`, `core set/get` and `core unlock` from the CLI: the owner's devices read the
/// private value, a follower answers "encrypted" until the owner's signature unlocks it.
#[test]
fn a_private_namespace_from_the_cli_is_plain_on_devices_and_encrypted_elsewhere_until_unlocked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (key, address) = wallet(dir.path(), "owner")?;
    let key = key.to_str().unwrap_or_default().to_owned();
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &["--peer", &a.tcp_addr()])?;
    let c = TestNode::start(dir.path(), "c", &["--peer", &a.tcp_addr()])?;
    delegate(&a, &address, Path::new(&key))?;
    delegate(&b, &address, Path::new(&key))?;
    kubelt_ok(&c.repo, &["core", "follow", &address])?;
    wait_until("both device keys at A", Duration::from_secs(30), || {
        let listed = a.call("core_ls", Value::Null)?;
        Ok(listed[0]["namespaces"].as_array().is_some_and(|n| n.iter().filter(|n| n.as_str().is_some_and(|n| n.starts_with("_device:"))).count() == 2))
    })?;

    let out = kubelt_ok(&a.repo, &["core", "private", &address, "notes"])?;
    assert!(out.contains("is private"), "{out}");
    kubelt_ok(&a.repo, &["core", "set", &address, "notes", "diary", "\"cli-secret\""])?;
    wait_until("B to read the private value", Duration::from_secs(30), || Ok(kubelt_ok(&b.repo, &["core", "get", &address, "notes", "diary"])?.contains("cli-secret")))?;
    wait_until("C to hold the value, encrypted", Duration::from_secs(30), || {
        let out = kubelt(&c.repo, &["core", "get", &address, "notes", "diary"])?;
        Ok(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("encrypted"))
    })?;
    let raw = c.call("core_get", json!({ "address": address, "namespace": "notes", "path": "diary" }));
    assert!(raw.as_ref().is_err_and(|e| e.to_string().contains("-32016")), "{raw:?}");

    // Without a signature, `core unlock` prints the text to sign.
    let message = kubelt_ok(&c.repo, &["core", "unlock", &address])?;
    assert!(message.contains("Unlock the private data of my Kubelt core"), "{message}");
    kubelt_ok(&a.repo, &["core", "unlock", &address, "--sign-with", &key])?;
    wait_until("C, unlocked, to read the value", Duration::from_secs(30), || {
        kubelt_ok(&c.repo, &["core", "unlock", &address, "--sign-with", &key])?;
        let out = kubelt(&c.repo, &["core", "get", &address, "notes", "diary"])?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cli-secret"))
    })?;
    Ok(())
}
