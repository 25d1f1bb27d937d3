//! `kubelt msg` as a user runs it, between real node processes: a message sent from one person's
//! node reaches the other's, which reads it; a node that only follows the recipient's core
//! keeps it encrypted; read and delete work; bad input gets a clear error.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{delegate, kubelt, kubelt_ok, wait_until, TestNode};
use serde_json::Value;

/// A test wallet: a fresh secp256k1 key file, and its address.
fn wallet(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let key = dir.join(format!("{name}.key"));
    let address = kubelt_ok(dir, &["core", "dev-wallet", "--create", key.to_str().unwrap_or_default()])?;
    Ok((key, address))
}

fn inbox(node: &TestNode, core: &str) -> anyhow::Result<Vec<Value>> {
    let listed: Value = serde_json::from_str(&kubelt_ok(&node.repo, &["msg", "inbox", core, "--json"])?)?;
    Ok(listed.as_array().cloned().unwrap_or_default())
}

#[test]
fn a_message_sent_from_the_cli_is_read_on_the_recipients_node_and_stays_encrypted_on_a_follower() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (alice_key, alice) = wallet(dir.path(), "alice")?;
    let (bob_key, bob) = wallet(dir.path(), "bob")?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &["--peer", &a.tcp_addr()])?;
    let f = TestNode::start(dir.path(), "f", &["--peer", &a.tcp_addr()])?;
    delegate(&a, &alice, &alice_key)?;
    delegate(&b, &bob, &bob_key)?;
    kubelt_ok(&f.repo, &["core", "follow", &bob])?;

    let text = "lunch at noon? (secret-marker-7f3a)";
    let sent = kubelt_ok(&a.repo, &["msg", "send", "--from", &alice, "--to", &bob, text])?;
    assert!(sent.contains("delivered") || sent.contains("queued"), "{sent}");

    // Bob's node holds a device key of Bob's core: it reads the text.
    wait_until("the message in bob's inbox on b", Duration::from_secs(30), || {
        Ok(inbox(&b, &bob)?.iter().any(|m| m["text"] == text))
    })?;
    let on_b = inbox(&b, &bob)?;
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    let message = &on_b[0];
    assert_eq!(message["from"].as_str().map(str::to_lowercase), Some(alice.to_lowercase()), "{message}");
    assert!(message["sent_at"].as_i64().is_some_and(|t| t > 0), "{message}");
    let id = message["id"].as_str().unwrap_or_default().to_owned();

    // The follower hosts Bob's inbox too, but holds no device key: ciphertext only, and the
    // CLI says so.
    wait_until("the message on the follower", Duration::from_secs(30), || Ok(inbox(&f, &bob)?.iter().any(|m| m["id"] == id.as_str())))?;
    let on_f = inbox(&f, &bob)?;
    assert_eq!(on_f[0]["text"], Value::Null, "{on_f:?}");
    let listed = kubelt_ok(&f.repo, &["msg", "inbox", &bob])?;
    assert!(listed.contains("[encrypted]") && !listed.contains("secret-marker"), "{listed}");

    // Read prints it; delete removes it, on this node.
    let read = kubelt_ok(&b.repo, &["msg", "read", &id])?;
    assert!(read.contains(text), "{read}");
    assert!(kubelt_ok(&b.repo, &["msg", "delete", &id])?.contains("deleted"));
    assert!(inbox(&b, &bob)?.is_empty());
    assert_eq!(kubelt_ok(&b.repo, &["msg", "inbox", &bob])?, "no messages");

    // Bad input: a clear error, nothing sent.
    let bad = kubelt(&a.repo, &["msg", "send", "--from", &alice, "--to", "0xnot-an-address", "hi"])?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.to_lowercase().contains("address"), "{err}");
    let unknown = kubelt(&b.repo, &["msg", "read", &"0".repeat(32)])?;
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("no message"), "{}", common::describe(&unknown));
    let not_mine = kubelt(&f.repo, &["msg", "send", "--from", &bob, "--to", &alice, "hi"])?;
    assert!(!not_mine.status.success(), "a follower cannot send as the core it follows");
    Ok(())
}
