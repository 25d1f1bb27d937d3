//! The command line as a user runs it: output, exit codes and clear errors on bad input.

mod common;

use common::{describe, kubelt, wait_until, TestNode};
use serde_json::Value;
use std::time::Duration;

#[test]
fn commands_without_a_running_node_say_so_and_fail() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    assert!(kubelt(&repo, &["init"])?.status.success());
    for args in [&["id"][..], &["swarm", "peers"], &["status", "--json"], &["swarm", "connect", "/ip4/127.0.0.1/tcp/1"]] {
        let out = kubelt(&repo, args)?;
        assert!(!out.status.success(), "{args:?}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no kubelt node is running"), "{args:?}: {}", describe(&out));
    }
    Ok(())
}

#[test]
fn init_refuses_an_existing_repo_unless_forced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    assert!(kubelt(&repo, &["init"])?.status.success());
    let key = std::fs::read(repo.join("node.key"))?;
    let out = kubelt(&repo, &["init"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{}", describe(&out));
    assert_eq!(std::fs::read(repo.join("node.key"))?, key, "refused init left the key alone");
    assert!(kubelt(&repo, &["init", "--force"])?.status.success());
    assert_ne!(std::fs::read(repo.join("node.key"))?, key);
    Ok(())
}

#[test]
fn bad_multiaddr_flag_and_bad_config_are_refused_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    assert!(kubelt(&repo, &["init"])?.status.success());
    let config = std::fs::read_to_string(repo.join("config.toml"))?;

    let out = kubelt(&repo, &["run", "--peer", "/ip4/999.1.1.1/tcp/1"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--peer") && stderr.contains("999.1.1.1"), "{}", describe(&out));

    std::fs::write(repo.join("config.toml"), "[network\nlisten = ")?;
    let out = kubelt(&repo, &["run"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.toml"), "{}", describe(&out));

    std::fs::write(repo.join("config.toml"), config.replace("[network]\n", "[network]\nlisten_on = []\n"))?;
    let out = kubelt(&repo, &["run"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field") && stderr.contains("listen_on"), "{}", describe(&out));

    std::fs::write(repo.join("config.toml"), config.replace("peers = []", "peers = [\"/dns9/x\"]"))?;
    let out = kubelt(&repo, &["run"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("peers"), "{}", describe(&out));

    // Nothing was damaged: with the original config the node starts.
    std::fs::write(repo.join("config.toml"), &config)?;
    let mut node = TestNode::start_on(&repo, "after-bad-input", &[])?;
    assert_eq!(node.stop()?, Some(0));
    Ok(())
}

#[test]
fn a_second_run_on_a_running_repo_is_refused_and_the_first_keeps_running() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = TestNode::start(dir.path(), "first", &[])?;
    let out = kubelt(&node.repo, &["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"), "{}", describe(&out));
    assert!(node.is_running());
    assert_eq!(node.call("node_id", Value::Null)?["peer_id"], Value::String(node.peer_id.clone()));

    // The CLI talks to the running node.
    let out = kubelt(&node.repo, &["id", "--json"])?;
    assert!(out.status.success(), "{}", describe(&out));
    let id: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(id["peer_id"], Value::String(node.peer_id.clone()));
    assert!(id["addresses"].as_array().is_some_and(|a| !a.is_empty()));

    // A clean stop leaves a repo that starts again without complaint.
    assert_eq!(node.stop()?, Some(0));
    let node = TestNode::start_on(&node.repo.clone(), "again", &[])?;
    assert!(!node.log().contains("ERROR"), "{}", node.log());
    Ok(())
}

#[test]
fn swarm_connect_and_peers_from_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &[])?;
    let out = kubelt(&a.repo, &["swarm", "connect", &b.tcp_addr()])?;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b.peer_id));
    wait_until("b to see a", Duration::from_secs(10), || Ok(b.connected_peers()?.contains(&a.peer_id)))?;
    let out = kubelt(&a.repo, &["swarm", "peers", "--json"])?;
    let peers: Value = serde_json::from_slice(&out.stdout)?;
    assert!(peers.as_array().is_some_and(|p| p.iter().any(|p| p["peer_id"] == Value::String(b.peer_id.clone()))));

    let out = kubelt(&a.repo, &["swarm", "connect", "/ip4/127.0.0.1/tcp/1"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1/tcp/1"), "{}", describe(&out));
    Ok(())
}

#[test]
fn the_api_cookie_is_private_and_new_at_every_start() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let mut node = TestNode::start(dir.path(), "n", &[])?;
    let cookie = node.repo.join("api.cookie");
    let mode = |path: &std::path::Path| -> anyhow::Result<u32> { Ok(std::fs::metadata(path)?.permissions().mode() & 0o777) };
    assert_eq!(mode(&cookie)?, 0o600);
    let first = std::fs::read_to_string(&cookie)?.trim().to_string();
    assert!(first.len() >= 32 && first.chars().all(|c| c.is_ascii_hexdigit()), "{first:?}");
    assert_eq!(first, node.secret());
    assert_eq!(node.stop()?, Some(0));

    // A cookie left readable by others (a careless copy, a restore) is replaced, not reused.
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o644))?;
    let node = TestNode::start_on(&node.repo.clone(), "n-again", &[])?;
    assert_eq!(mode(&cookie)?, 0o600);
    let second = std::fs::read_to_string(&cookie)?.trim().to_string();
    assert_ne!(second, first, "the secret is new at every start");
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"node_id"}"#;
    let (status, reply) = node.post_raw(call, Some(&first))?;
    assert_eq!((status, reply["error"]["code"].clone()), (401, Value::from(-32001)), "the old secret is refused: {reply}");
    let (status, _) = node.post_raw(call, Some(&second))?;
    assert_eq!(status, 200);
    Ok(())
}

#[test]
fn ctrl_c_stops_the_node_cleanly_and_a_restart_finds_its_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = TestNode::start(dir.path(), "n", &[])?;
    let file = dir.path().join("file.bin");
    let bytes = common::pseudo_random(700_000, 11);
    std::fs::write(&file, &bytes)?;
    let cid = common::kubelt_ok(&node.repo, &["add", "-q", file.to_str().unwrap_or_default()])?;
    let key = dir.path().join("owner.key");
    let address = common::kubelt_ok(dir.path(), &["core", "dev-wallet", "--create", key.to_str().unwrap_or_default()])?;
    let message = common::kubelt_ok(&node.repo, &["core", "delegate", &address])?;
    let message_file = dir.path().join("d.siwe");
    std::fs::write(&message_file, message)?;
    common::kubelt_ok(&node.repo, &["core", "submit", "--message-file", message_file.to_str().unwrap_or_default(), "--sign-with", key.to_str().unwrap_or_default()])?;
    common::kubelt_ok(&node.repo, &["core", "set", &address, "app", "greeting", "\"hello\""])?;

    // What Ctrl-C sends: SIGINT to the foreground process.
    let (code, took) = node.stop_with(libc::SIGINT)?;
    assert_eq!(code, Some(0), "exit status after SIGINT:\n{}", node.log());
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    assert!(node.log().contains("kubelt node stopped"), "{}", node.log());
    assert!(!node.repo.join("api").exists(), "a clean stop removes the API address file");

    let node = TestNode::start_on(&node.repo.clone(), "n-again", &[])?;
    assert!(kubelt(&node.repo, &["cat", &cid])?.stdout == bytes, "the content is back after the restart");
    assert!(common::kubelt_ok(&node.repo, &["pin", "ls"])?.contains(&cid));
    assert_eq!(common::kubelt_ok(&node.repo, &["core", "get", &address, "app", "greeting"])?, "\"hello\"");
    assert!(!node.log().contains("ERROR"), "{}", node.log());
    Ok(())
}
