//! The app API (issue 12) as an app sees it, against `kubelt run` processes: a wallet signs in
//! with a real secp256k1 key held by the test (the node never sees it), reads and writes its
//! core, and every refusal comes with its own code. Run inside a private network namespace
//! (scripts/test.sh does).

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{wait_until, TestNode};
use kubelt_protocol::core::DevWallet;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

const ORIGIN: &str = "https://notes.example";

/// The codes of the app API (rpc/app/mod.rs), as a client reads them in the README.
const WRONG_SIGNER: i64 = -32030;
const NONCE_UNKNOWN: i64 = -32031;
const NONCE_USED: i64 = -32033;
const TOKEN_MISSING: i64 = -32034;
const TOKEN_REVOKED: i64 = -32036;
const TOKEN_INVALID: i64 = -32037;
const TOKEN_WRONG_CORE: i64 = -32039;
const CAPABILITY_MISSING: i64 = -32040;
const OWNER_NOT_ALLOWED: i64 = -32042;
const QUOTA_EXCEEDED: i64 = -32041;
const REQUEST_OVER_QUOTA: i64 = -32045;
const CORE_FULL: i64 = -32046;

/// Posts a raw body to the app API of `node` (at `path`), with a token and an `Origin`.
fn post_raw(node: &TestNode, path: &str, token: Option<&str>, body: &str) -> anyhow::Result<(u16, Value)> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut request = agent.post(&format!("{}{path}", node.app_url())).set("Content-Type", "application/json").set("Origin", ORIGIN);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.send_string(body) {
        Ok(r) => Ok((r.status(), r.into_json()?)),
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or(Value::Null))),
        Err(e) => Err(e.into()),
    }
}

/// Sends a 3 MiB body (over the 2 MiB limit) and reads the answer.
fn oversized(node: &TestNode) -> anyhow::Result<(u16, Value)> {
    use std::io::{Read, Write};
    let authority = node.app_url().trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut stream = TcpStream::connect(&authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "POST / HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 3 << 20)?;
    // The server may answer before it read the whole body: send it from another thread.
    let mut writer = stream.try_clone()?;
    std::thread::spawn(move || writer.write_all(&vec![b' '; 3 << 20]));
    let mut answer = String::new();
    let mut buffer = [0u8; 4096];
    while answer.split("\r\n\r\n").nth(1).is_none_or(|body| serde_json::from_str::<Value>(body).is_err()) {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        answer.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Calls a method; returns the whole reply.
fn call(node: &TestNode, token: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string();
    Ok(post_raw(node, "", token, &body)?.1)
}

/// Calls a method that must succeed; returns its result.
fn ok(node: &TestNode, token: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
    let reply = call(node, token, method, params)?;
    match reply.get("error") {
        Some(error) => bail!("{method} failed: {error}"),
        None => Ok(reply["result"].clone()),
    }
}

/// The error code of a reply that must be an error.
fn code_of(reply: &Value) -> i64 {
    reply["error"]["code"].as_i64().unwrap_or_else(|| panic!("not an error: {reply}"))
}

fn hex_sig(wallet: &DevWallet, message: &str) -> anyhow::Result<String> {
    Ok(format!("0x{}", hex::encode(wallet.sign(message)?)))
}

/// Signs in `wallet` on `node` for `capabilities`; returns the verify reply.
fn login(node: &TestNode, wallet: &DevWallet, capabilities: Value) -> anyhow::Result<Value> {
    let address = wallet.address().to_checksum();
    let started = ok(node, None, "kb_getNonce", json!([address, capabilities]))?;
    let message = started["message"].as_str().context("no message")?;
    ok(node, None, "kb_verifyNonce", json!({"nonce": started["nonce"], "signature": hex_sig(wallet, message)?}))
}

fn token_of(reply: &Value) -> anyhow::Result<String> {
    reply["token"].as_str().map(String::from).context("no token")
}

#[test]
fn a_wallet_signs_in_uses_its_core_and_every_refusal_has_its_code() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let stranger = DevWallet::random();
    let address = owner.address().to_checksum();
    let mut node = TestNode::start(dir.path(), "a", &["--owner", &address])?;

    // Discovery and ping need nothing; admin methods do not exist here.
    let doc = ok(&node, None, "rpc.discover", Value::Null)?;
    let names: Vec<&str> = doc["methods"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
    for name in ["kb_getNonce", "kb_verifyNonce", "kb_getData", "kb_setData", "kb_subscribe", "kb_logout", "kb_getCoreAddresses", "kb_ping"] {
        assert!(names.contains(&name), "{name} not in rpc.discover: {names:?}");
    }
    for code in [WRONG_SIGNER, NONCE_USED, TOKEN_REVOKED, CAPABILITY_MISSING, OWNER_NOT_ALLOWED] {
        assert!(doc["components"]["errors"].get(code.to_string()).is_some(), "{code} not documented");
    }
    assert_eq!(ok(&node, None, "kb_ping", Value::Null)?, "pong");
    assert_eq!(code_of(&call(&node, None, "node_id", Value::Null)?), -32601);
    // The admin cookie is not a token here.
    assert_eq!(code_of(&call(&node, Some(node.secret()), "kb_getCoreAddresses", Value::Null)?), TOKEN_INVALID);

    // A personal node: only its owners sign in.
    let refused = call(&node, None, "kb_getNonce", json!([stranger.address().to_checksum(), {"notes": ["read"]}]))?;
    assert_eq!(code_of(&refused), OWNER_NOT_ALLOWED, "{refused}");

    // The message is a SIWE sign-in for the app's origin, with the nonce it was issued with.
    let caps = json!({"notes": ["read", "write"], "profile": ["read"]});
    let started = ok(&node, None, "kb_getNonce", json!({"address": address, "capabilities": caps}))?;
    let (nonce, message) = (started["nonce"].as_str().context("nonce")?, started["message"].as_str().context("message")?);
    assert!(message.starts_with("notes.example wants you to sign in with your Ethereum account:\n"), "{message}");
    assert!(message.contains(&address) && message.contains(&format!("Nonce: {nonce}")) && message.contains(&node.peer_id), "{message}");
    // Signed by another key: refused, and the nonce is spent.
    let wrong = call(&node, None, "kb_verifyNonce", json!([nonce, hex_sig(&stranger, message)?]))?;
    assert_eq!(code_of(&wrong), WRONG_SIGNER, "{wrong}");
    assert_eq!(code_of(&call(&node, None, "kb_verifyNonce", json!([nonce, hex_sig(&owner, message)?]))?), NONCE_USED);
    assert_eq!(code_of(&call(&node, None, "kb_verifyNonce", json!(["abcdefgh12345678", hex_sig(&owner, message)?]))?), NONCE_UNKNOWN);

    let session = login(&node, &owner, caps.clone())?;
    assert_eq!(session["address"], address);
    assert_eq!(session["capabilities"], json!({"notes": ["read", "write"], "profile": ["read"]}));
    let token = token_of(&session)?;
    let t = Some(token.as_str());

    assert_eq!(ok(&node, t, "kb_getCoreAddresses", Value::Null)?, json!({"eth": [address]}));
    let written = ok(&node, t, "kb_setData", json!(["notes", "first", {"text": "hello"}]))?;
    assert_eq!(written, json!({"namespace": "notes", "path": "first", "value": {"text": "hello"}}));
    let read = ok(&node, t, "kb_getData", json!({"namespace": "notes", "path": "first"}))?;
    assert_eq!(read["value"], json!({"text": "hello"}));
    // The write is a change of the core, as the operator sees it too.
    assert_eq!(node.call("core_get", json!([address, "notes", "first"]))?, json!({"text": "hello"}));

    // Refusals, each with its code.
    assert_eq!(code_of(&call(&node, t, "kb_setData", json!(["profile", "name", "x"]))?), CAPABILITY_MISSING);
    assert_eq!(code_of(&call(&node, t, "kb_getData", json!(["secrets", "x"]))?), CAPABILITY_MISSING);
    assert_eq!(code_of(&call(&node, None, "kb_getData", json!(["notes"]))?), TOKEN_MISSING);
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered)?;
    assert_eq!(code_of(&call(&node, Some(&tampered), "kb_getData", json!(["notes"]))?), TOKEN_INVALID);
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "kb_getData", "params": ["notes"]}).to_string();
    let (_, other_core) = post_raw(&node, &format!("@{}", stranger.address().to_checksum()), t, &body)?;
    assert_eq!(code_of(&other_core), TOKEN_WRONG_CORE, "{other_core}");
    let (_, same_core) = post_raw(&node, &format!("@{address}"), t, &body)?;
    assert_eq!(same_core["result"]["value"]["first"]["text"], "hello", "{same_core}");
    // The app token is not an admin secret.
    let (status, _) = node.post_raw(&json!({"jsonrpc": "2.0", "id": 1, "method": "node_id"}).to_string(), Some(&token))?;
    assert_eq!(status, 401);

    // Malformed requests.
    assert_eq!(code_of(&post_raw(&node, "", t, "{\"jsonrpc\":")?.1), -32700);
    assert_eq!(code_of(&call(&node, t, "kb_nope", Value::Null)?), -32601);
    assert_eq!(code_of(&call(&node, t, "kb_setData", json!(["notes"]))?), -32602);
    assert_eq!(code_of(&call(&node, t, "kb_getNonce", json!({"address": "0x12", "capabilities": {}}))?), -32602);
    let (status, reply) = oversized(&node)?;
    assert_eq!((status, code_of(&reply)), (413, -32003), "{reply}");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(code_of(&post_raw(&node, "", t, &deep)?.1), -32700, "deep nesting is a parse error, not a crash");
    assert_eq!(ok(&node, t, "kb_ping", Value::Null)?, "pong", "the node still serves after the bad requests");

    // Logout revokes the token, also after a restart; a new login works.
    assert_eq!(ok(&node, t, "kb_logout", Value::Null)?, true);
    assert_eq!(code_of(&call(&node, t, "kb_getData", json!(["notes"]))?), TOKEN_REVOKED);
    node.stop()?;
    let node = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    assert_eq!(code_of(&call(&node, t, "kb_getData", json!(["notes"]))?), TOKEN_REVOKED, "a logout must survive a restart");
    let again = token_of(&login(&node, &owner, json!({"notes": ["read"]}))?)?;
    assert_eq!(ok(&node, Some(&again), "kb_getData", json!(["notes", "first"]))?["value"]["text"], "hello");
    assert_eq!(code_of(&call(&node, Some(&again), "kb_setData", json!(["notes", "x", 1]))?), CAPABILITY_MISSING, "a read-only login cannot write");
    Ok(())
}

/// A JSON-RPC client over a WebSocket to the app API.
struct Socket {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Socket {
    fn open(node: &TestNode, token: &str) -> anyhow::Result<Socket> {
        let authority = node.app_url().trim_start_matches("http://").trim_end_matches('/').to_string();
        let stream = TcpStream::connect(&authority)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let request = format!("ws://{authority}/?access_token={token}").into_client_request()?;
        let (socket, _) = tungstenite::client(request, stream).map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
        Ok(Socket { socket, next_id: 1 })
    }

    /// Calls a method; returns its reply (skipping notifications).
    fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.socket.send(Message::text(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()))?;
        loop {
            let message: Value = serde_json::from_str(self.socket.read()?.to_text()?)?;
            if message["id"] == id {
                return Ok(message);
            }
        }
    }

    /// The next notification, within `timeout`.
    fn notification(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let message: Value = serde_json::from_str(self.socket.read()?.to_text()?)?;
            if message.get("method").is_some() {
                return Ok(message);
            }
        }
        bail!("no notification within {timeout:?}")
    }
}

/// Two apps of one person on one node, each writing its own namespace: the second login must
/// not take the first app's namespace away (each login delegates its namespaces to the node key,
/// and the node once kept only the newest delegation, so the first app's writes were refused).
#[test]
fn two_app_logins_on_one_node_both_keep_writing_their_namespaces() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let address = owner.address().to_checksum();
    let mut node = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    let notes = token_of(&login(&node, &owner, json!({"notes": ["read", "write"]}))?)?;
    let photos = token_of(&login(&node, &owner, json!({"photos": ["read", "write"]}))?)?;
    ok(&node, Some(&photos), "kb_setData", json!(["photos", "p1", "a photo"]))?;
    ok(&node, Some(&notes), "kb_setData", json!(["notes", "n1", "a note"]))?;
    // Each token still writes only what it was granted.
    assert_eq!(code_of(&call(&node, Some(&notes), "kb_setData", json!(["photos", "p2", 1]))?), CAPABILITY_MISSING);
    assert_eq!(ok(&node, Some(&notes), "kb_getData", json!(["notes", "n1"]))?["value"], "a note");
    assert_eq!(ok(&node, Some(&photos), "kb_getData", json!(["photos", "p1"]))?["value"], "a photo");
    // And after a restart, from the delegations the node stored.
    node.stop()?;
    let node = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    ok(&node, Some(&notes), "kb_setData", json!(["notes", "n2", "after restart"]))?;
    ok(&node, Some(&photos), "kb_setData", json!(["photos", "p2", "after restart"]))?;
    Ok(())
}

/// A person with no software of their own: a node that only follows (or hosts) their core
/// holds the private values as ciphertext until the person's wallet, through an app, unlocks
/// them there with `kb_unlock`; their apps then read the plain values on that node.
#[test]
fn an_app_unlocks_private_data_on_a_node_that_holds_only_ciphertext() -> anyhow::Result<()> {
    const ENCRYPTED: i64 = -32016;
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let address = owner.address().to_checksum();
    let a = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    let b = TestNode::start(dir.path(), "b", &["--owner", &address, "--peer", &a.tcp_addr()])?;
    let writer = token_of(&login(&a, &owner, json!({"diary": ["read", "write"]}))?)?;
    a.call("core_private", json!({"address": address, "namespace": "diary"}))?;
    // The device that writes shares the data key with the wallet once the wallet unlocks it.
    let message = ok(&a, Some(&writer), "kb_getUnlockMessage", Value::Null)?["message"].as_str().context("no message")?.to_string();
    assert!(message.contains(&address), "{message}");
    let signature = hex_sig(&owner, &message)?;
    ok(&a, Some(&writer), "kb_unlock", json!([signature]))?;
    ok(&a, Some(&writer), "kb_setData", json!(["diary", "today", "app-secret"]))?;
    assert_eq!(ok(&a, Some(&writer), "kb_getData", json!(["diary", "today"]))?["value"], "app-secret");

    // B follows the core for a read-only app: it gets the change, but only ciphertext.
    let reader = token_of(&login(&b, &owner, json!({"diary": ["read"]}))?)?;
    wait_until("B to hold the private value, encrypted", Duration::from_secs(60), || {
        Ok(call(&b, Some(&reader), "kb_getData", json!(["diary", "today"]))?["error"]["code"] == ENCRYPTED)
    })?;
    // A bad signature unlocks nothing.
    let wrong = hex_sig(&DevWallet::random(), &message)?;
    assert!(call(&b, Some(&reader), "kb_unlock", json!([wrong]))?.get("error").is_some(), "a stranger's signature must not unlock");
    assert_eq!(code_of(&call(&b, Some(&reader), "kb_getData", json!(["diary", "today"]))?), ENCRYPTED);
    // The wallet's signature, through the app, does.
    wait_until("B, unlocked by the app, to read the value", Duration::from_secs(30), || {
        ok(&b, Some(&reader), "kb_unlock", json!({"signature": signature}))?;
        Ok(call(&b, Some(&reader), "kb_getData", json!(["diary", "today"]))?["result"]["value"] == "app-secret")
    })?;
    Ok(())
}

#[test]
fn a_change_written_on_another_replica_reaches_a_subscriber_and_tokens_stay_with_their_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let address = owner.address().to_checksum();
    let a = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    let b = TestNode::start(dir.path(), "b", &["--owner", &address, "--peer", &a.tcp_addr()])?;
    let caps = json!({"notes": ["read", "write"]});
    let token_a = token_of(&login(&a, &owner, caps.clone())?)?;
    let token_b = token_of(&login(&b, &owner, caps)?)?;
    // A token of node B is not one of node A's.
    assert_eq!(code_of(&call(&a, Some(&token_b), "kb_getData", json!(["notes"]))?), TOKEN_INVALID);

    let mut socket = Socket::open(&a, &token_a)?;
    let subscribed = socket.call("kb_subscribe", json!(["notes"]))?;
    let id = subscribed["result"].as_str().with_context(|| format!("no subscription id: {subscribed}"))?.to_string();
    // Both replicas must see each other on the core's topic before B's write can reach A.
    wait_until("the two replicas to meet", Duration::from_secs(60), || {
        let cores = a.call("core_ls", Value::Null)?;
        Ok(cores.as_array().into_iter().flatten().any(|c| c["address"] == address && c["replicas"].as_u64().unwrap_or(0) >= 1))
    })?;
    ok(&b, Some(&token_b), "kb_setData", json!(["notes", "from-b", "written on b"]))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let note = socket.notification(Duration::from_secs(30))?;
        assert_eq!(note["method"], "kb_subscription");
        assert_eq!(note["params"]["subscription"], id);
        if note["params"]["result"]["value"]["from-b"] == "written on b" {
            break;
        }
        if Instant::now() > deadline {
            bail!("B's write never reached A's subscriber; last: {note}");
        }
    }
    let unsubscribed = socket.call("kb_unsubscribe", json!([id]))?;
    assert_eq!(unsubscribed["result"], true);

    // A subscription lives no longer than its token: after kb_logout, the next change ends it.
    let again = socket.call("kb_subscribe", json!(["notes"]))?;
    let id = again["result"].as_str().with_context(|| format!("no subscription id: {again}"))?.to_string();
    assert_eq!(socket.call("kb_logout", Value::Null)?["result"], true);
    ok(&b, Some(&token_b), "kb_setData", json!(["notes", "after-logout", 1]))?;
    let last = socket.notification(Duration::from_secs(60))?;
    assert_eq!((&last["params"]["subscription"], &last["params"]["error"]["code"]), (&json!(id), &json!(TOKEN_REVOKED)), "{last}");
    assert_eq!(code_of(&socket.call("kb_getData", json!(["notes"]))?), TOKEN_REVOKED, "calls on the socket check the token too");
    Ok(())
}

/// Messaging (issue 13) through the app API: an app of alice's sends to bob with
/// `kb_sendMessage`; bob's app, subscribed to `kb_subscribe("messages")` on bob's node, is
/// notified with the decrypted text and lists it with `kb_listMessages`. Tokens without the
/// `messages` capability, or with it read-only, are refused with their code.
#[test]
fn an_app_sends_a_message_that_the_recipients_app_is_notified_of_and_lists() -> anyhow::Result<()> {
    const MSG_TOO_LARGE: i64 = -32022;
    const MSG_REFUSED: i64 = -32023;
    const NEEDS_WEBSOCKET: i64 = -32004;
    let dir = tempfile::tempdir()?;
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let (alice_address, bob_address) = (alice.address().to_checksum(), bob.address().to_checksum());
    let a = TestNode::start(dir.path(), "a", &["--owner", &alice_address])?;
    let b = TestNode::start(dir.path(), "b", &["--owner", &bob_address, "--peer", &a.tcp_addr()])?;

    let doc = ok(&a, None, "rpc.discover", Value::Null)?;
    let names: Vec<&str> = doc["methods"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
    assert!(names.contains(&"kb_sendMessage") && names.contains(&"kb_listMessages"), "{names:?}");
    for code in [MSG_TOO_LARGE, MSG_REFUSED, -32020, CAPABILITY_MISSING] {
        assert!(doc["components"]["errors"].get(code.to_string()).is_some(), "{code} not documented");
    }

    // Logins: alice may send; bob reads (his node is a device of his core through the login's
    // delegation of `messages`).
    let alice_writes = token_of(&login(&a, &alice, json!({"messages": ["read", "write"]}))?)?;
    let alice_reads = token_of(&login(&a, &alice, json!({"messages": ["read"]}))?)?;
    let bob_token = token_of(&login(&b, &bob, json!({"messages": ["read", "write"], "notes": ["read", "write"]}))?)?;
    let bob_notes = token_of(&login(&b, &bob, json!({"notes": ["read"]}))?)?;

    // Refusals, each with its code, before anything is sent.
    let text_for_bob = json!([bob_address, "lunch at noon?"]);
    assert_eq!(code_of(&call(&a, Some(&alice_reads), "kb_sendMessage", text_for_bob.clone())?), CAPABILITY_MISSING, "a read-only token cannot send");
    assert_eq!(code_of(&call(&b, Some(&bob_notes), "kb_listMessages", Value::Null)?), CAPABILITY_MISSING, "no messages capability");
    assert_eq!(code_of(&call(&b, Some(&bob_notes), "kb_sendMessage", json!([alice_address, "hi"]))?), CAPABILITY_MISSING);
    assert_eq!(code_of(&call(&a, None, "kb_sendMessage", text_for_bob.clone())?), TOKEN_MISSING);
    let huge = "x".repeat(64 * 1024 + 1);
    assert_eq!(code_of(&call(&a, Some(&alice_writes), "kb_sendMessage", json!([bob_address, huge]))?), MSG_TOO_LARGE);
    assert_eq!(code_of(&call(&a, Some(&alice_writes), "kb_sendMessage", json!(["0xnot-an-address", "hi"]))?), -32602);
    assert_eq!(code_of(&call(&b, Some(&bob_token), "kb_subscribe", json!(["messages"]))?), NEEDS_WEBSOCKET);
    assert_eq!(ok(&a, Some(&alice_reads), "kb_listMessages", Value::Null)?, json!([]), "a read token lists alice's (empty) inbox");

    let mut refused = Socket::open(&b, &bob_notes)?;
    assert_eq!(code_of(&refused.call("kb_subscribe", json!(["messages"]))?), CAPABILITY_MISSING, "no messages capability on the socket either");
    let mut socket = Socket::open(&b, &bob_token)?;
    let subscribed = socket.call("kb_subscribe", json!(["messages"]))?;
    let subscription = subscribed["result"].as_str().with_context(|| format!("no subscription id: {subscribed}"))?.to_string();

    // Alice's app sends; the first message waits for bob's device key to reach node a.
    let mut sent = Value::Null;
    wait_until("bob's device key on alice's node", Duration::from_secs(60), || {
        let reply = call(&a, Some(&alice_writes), "kb_sendMessage", text_for_bob.clone())?;
        if reply["error"]["code"] == json!(-32020) {
            return Ok(false);
        }
        sent = reply.get("result").cloned().with_context(|| format!("kb_sendMessage failed: {reply}"))?;
        Ok(true)
    })?;
    let id = sent["id"].as_str().with_context(|| format!("no id: {sent}"))?.to_string();
    assert_eq!(sent["to"], bob_address);

    let note = socket.notification(Duration::from_secs(60))?;
    assert_eq!(note["method"], "kb_subscription");
    assert_eq!(note["params"]["subscription"], subscription);
    let pushed = &note["params"]["result"];
    assert_eq!((&pushed["id"], &pushed["from"], &pushed["text"]), (&json!(id), &json!(alice_address), &json!("lunch at noon?")), "{note}");

    let listed = ok(&b, Some(&bob_token), "kb_listMessages", Value::Null)?;
    let messages = listed.as_array().context("not a list")?;
    assert_eq!(messages.len(), 1, "{listed}");
    assert_eq!((&messages[0]["id"], &messages[0]["from"], &messages[0]["text"]), (&json!(id), &json!(alice_address), &json!("lunch at noon?")));
    assert!(messages[0]["sent_at"].as_i64().is_some_and(|t| t > 0), "{listed}");
    let received_at = messages[0]["received_at"].as_i64().context("no received_at")?;
    assert_eq!(ok(&b, Some(&bob_token), "kb_listMessages", json!([{"since": received_at}]))?, json!([]), "nothing received after it");
    assert_eq!(ok(&b, Some(&bob_token), "kb_listMessages", json!({"options": {"since": received_at - 1}}))?.as_array().map(Vec::len), Some(1));

    // A second message arrives on the same subscription; bob answers through his own token.
    ok(&a, Some(&alice_writes), "kb_sendMessage", json!([bob_address, "or one?"]))?;
    let note = socket.notification(Duration::from_secs(60))?;
    assert_eq!(note["params"]["result"]["text"], "or one?", "{note}");
    ok(&b, Some(&bob_token), "kb_sendMessage", json!([alice_address, "noon it is"]))?;
    wait_until("bob's answer in alice's inbox", Duration::from_secs(60), || {
        let inbox = ok(&a, Some(&alice_reads), "kb_listMessages", Value::Null)?;
        Ok(inbox.as_array().into_iter().flatten().any(|m| m["text"] == "noon it is" && m["from"] == json!(bob_address)))
    })?;
    Ok(())
}

#[test]
fn a_hosted_node_keeps_wallets_apart_and_a_quota_refuses_one_without_touching_others() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("host");
    common::kubelt_ok(&repo, &["init"])?;
    for (from, to) in [
        ("cores = 1000", "cores = 2"),
        ("requests_per_minute = 6000", "requests_per_minute = 5"),
        ("websockets_per_token = 8", "websockets_per_token = 1"),
        ("logins_per_minute_per_ip = 20", "logins_per_minute_per_ip = 4"),
    ] {
        common::edit_config(&repo, from, to)?;
    }
    let node = TestNode::start_on(&repo, "host", &["--hosted"])?;
    let (one, two, three) = (DevWallet::random(), DevWallet::random(), DevWallet::random());
    let caps = json!({"notes": ["read", "write"]});
    // Any wallet signs in on a hosted node, each into its own core.
    let t1 = token_of(&login(&node, &one, caps.clone())?)?;
    let t2 = token_of(&login(&node, &two, caps.clone())?)?;
    ok(&node, Some(&t1), "kb_setData", json!(["notes", "mine", "one's"]))?;
    assert_eq!(ok(&node, Some(&t2), "kb_getData", json!(["notes", "mine"]))?["value"], Value::Null, "two reads its own core");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "kb_getData", "params": ["notes"]}).to_string();
    let (_, across) = post_raw(&node, &format!("@{}", one.address().to_checksum()), Some(&t2), &body)?;
    assert_eq!(code_of(&across), TOKEN_WRONG_CORE, "{across}");

    // Cores per node: a third wallet is refused, and holds nothing here.
    let started = ok(&node, None, "kb_getNonce", json!([three.address().to_checksum(), caps]))?;
    let signature = hex_sig(&three, started["message"].as_str().context("message")?)?;
    let full = call(&node, None, "kb_verifyNonce", json!([started["nonce"], signature]))?;
    assert_eq!(code_of(&full), QUOTA_EXCEEDED, "{full}");
    assert!(full["error"]["message"].as_str().unwrap_or("").contains("cores"), "{full}");
    // Logins per minute from one address: the fourth is the last.
    ok(&node, None, "kb_getNonce", json!([one.address().to_checksum(), {"notes": ["read"]}]))?;
    let flood = call(&node, None, "kb_getNonce", json!([one.address().to_checksum(), {"notes": ["read"]}]))?;
    assert_eq!(code_of(&flood), QUOTA_EXCEEDED, "{flood}");
    assert!(flood["error"]["message"].as_str().unwrap_or("").contains("logins"), "{flood}");

    // Calls per minute per core: one's fifth call (a write and four reads) is its last; two is
    // not affected.
    for _ in 0..4 {
        ok(&node, Some(&t1), "kb_getData", json!(["notes"]))?;
    }
    let over = call(&node, Some(&t1), "kb_getData", json!(["notes"]))?;
    assert_eq!(code_of(&over), QUOTA_EXCEEDED, "{over}");
    ok(&node, Some(&t2), "kb_getData", json!(["notes"]))?;

    // WebSocket connections per token: a second is refused until the first closes.
    let first = Socket::open(&node, &t2)?;
    let second = Socket::open(&node, &t2).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(second.contains("429"), "a second connection of the token was not refused: {second}");
    drop(first);
    wait_until("the closed connection to be released", Duration::from_secs(10), || Ok(Socket::open(&node, &t2).is_ok()))?;
    Ok(())
}

#[test]
fn a_hosted_node_refuses_requests_and_cores_over_their_byte_quotas_and_recovers() -> anyhow::Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("host");
    common::kubelt_ok(&repo, &["init"])?;
    common::edit_config(&repo, "bytes_per_core = 67108864", "bytes_per_core = 8192")?;
    common::edit_config(&repo, "max_request_bytes = 2097152", "max_request_bytes = 4096")?;
    let mut node = TestNode::start_on(&repo, "host", &["--hosted"])?;
    let (one, two) = (DevWallet::random(), DevWallet::random());
    let caps = json!({"notes": ["read", "write"]});
    let t1 = token_of(&login(&node, &one, caps.clone())?)?;
    let t2 = token_of(&login(&node, &two, caps.clone())?)?;
    let doc = ok(&node, None, "rpc.discover", Value::Null)?;
    for code in [REQUEST_OVER_QUOTA, CORE_FULL] {
        assert!(doc["components"]["errors"].get(code.to_string()).is_some(), "{code} not documented");
    }

    // Request size: refused before anything runs; the next request of normal size is served.
    let big = call(&node, Some(&t1), "kb_setData", json!(["notes", "big", "x".repeat(5000)]))?;
    assert_eq!(code_of(&big), REQUEST_OVER_QUOTA, "{big}");
    assert_eq!(ok(&node, Some(&t1), "kb_getData", json!(["notes", "big"]))?["value"], Value::Null, "nothing was written");

    // Bytes per core: an object and then values of 1 kB, until the core is full.
    ok(&node, Some(&t1), "kb_putObject", json!(["notes", "file", b64.encode(vec![7u8; 2000])]))?;
    let value = "y".repeat(1000);
    let mut written = 0;
    let full = loop {
        let reply = call(&node, Some(&t1), "kb_setData", json!(["notes", format!("k{written}"), value]))?;
        if reply.get("error").is_some() {
            break reply;
        }
        written += 1;
        assert!(written < 20, "a core of 8 kB took {written} values of 1 kB");
    };
    assert_eq!(code_of(&full), CORE_FULL, "{full}");
    assert!(written >= 2, "only {written} values fit");
    assert_eq!(ok(&node, Some(&t1), "kb_getData", json!(["notes", format!("k{written}")]))?["value"], Value::Null, "the refused write is not there");
    assert_eq!(ok(&node, Some(&t1), "kb_getData", json!(["notes", "k0"]))?["value"], json!(value), "what was written stays readable");
    let object = call(&node, Some(&t1), "kb_putObject", json!(["notes", "more", b64.encode(vec![1u8; 1500])]))?;
    assert_eq!(code_of(&object), CORE_FULL, "{object}");
    // Another core on the node is not affected.
    ok(&node, Some(&t2), "kb_setData", json!(["notes", "k0", value]))?;

    // The operator raises the quota: the core takes writes again.
    node.stop()?;
    common::edit_config(&repo, "bytes_per_core = 8192", "bytes_per_core = 1048576")?;
    let node = TestNode::start_on(&repo, "host", &["--hosted"])?;
    ok(&node, Some(&t1), "kb_setData", json!(["notes", format!("k{written}"), value]))?;
    Ok(())
}

#[test]
fn objects_are_pinned_content_recorded_in_the_core_with_every_version_readable() -> anyhow::Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let address = owner.address().to_checksum();
    let node = TestNode::start(dir.path(), "a", &["--owner", &address])?;
    let token = token_of(&login(&node, &owner, json!({"files": ["read", "write"]}))?)?;
    let t = Some(token.as_str());
    let first = ok(&node, t, "kb_putObject", json!(["files", "doc", b64.encode("version one"), {"contentType": "text/plain"}]))?;
    let second = ok(&node, t, "kb_putObject", json!({"namespace": "files", "path": "doc", "data": b64.encode("version two!"), "options": {"visibility": "private"}}))?;
    assert_eq!((first["version"].as_u64(), first["size"].as_u64()), (Some(1), Some(11)));
    assert_eq!((second["version"].as_u64(), second["size"].as_u64()), (Some(2), Some(12)));
    let latest = ok(&node, t, "kb_getObject", json!(["files", "doc"]))?;
    assert_eq!(b64.decode(latest["data"].as_str().context("data")?)?, b"version two!");
    assert_eq!(latest["cid"], second["cid"]);
    let old = ok(&node, t, "kb_getObject", json!(["files", "doc", {"version": 1}]))?;
    assert_eq!(b64.decode(old["data"].as_str().context("data")?)?, b"version one");
    assert_eq!(old["contentType"], "text/plain");
    // The bytes are content of this node, pinned, under the CID the core records.
    let cid = first["cid"].as_str().context("cid")?;
    let cat = node.call("content_cat", json!([cid]))?;
    assert_eq!(b64.decode(cat["data_base64"].as_str().context("cat")?)?, b"version one");
    let pins = node.call("pin_ls", Value::Null)?.to_string();
    assert!(pins.contains(cid) && pins.contains(second["cid"].as_str().unwrap_or("?")), "{pins}");
    let record = node.call("core_get", json!([address, "files", "doc"]))?;
    assert_eq!(record["versions"].as_array().map(Vec::len), Some(2), "{record}");
    Ok(())
}

/// The app API benchmark (`scripts/bench.sh app`; ignored in the test run): `kb_setData` and
/// then `kb_getData` from 16 concurrent clients (keep-alive HTTP, one thread each) on loopback
/// for `KUBELT_BENCH_SECS` seconds each (default 10); prints requests/s, p50 and p99. With
/// `KUBELT_BENCH_BASELINE=<another kubelt binary>` (e.g. the build of `main`) that binary is
/// measured first, in the same run, on a repo of its own.
#[test]
#[ignore = "a benchmark: scripts/bench.sh app"]
fn bench_app_api_16_clients() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("KUBELT_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let mut runs: Vec<(&str, Option<std::path::PathBuf>)> = Vec::new();
    if let Some(bin) = common::baseline_binary() {
        runs.push(("baseline", Some(bin)));
    }
    runs.push(("this build", None));
    for (label, bin) in runs {
        bench_app_api_once(label, bin.as_deref(), seconds)?;
    }
    Ok(())
}

fn bench_app_api_once(label: &str, bin: Option<&std::path::Path>, seconds: u64) -> anyhow::Result<()> {
    const CLIENTS: usize = 16;
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let address = owner.address().to_checksum();
    let repo = dir.path().join("bench");
    common::init_with(&repo, bin)?;
    // The per-core call quota would otherwise be what is measured.
    common::edit_config(&repo, "requests_per_minute = 6000", "requests_per_minute = 100000000")?;
    let wrapper = bin.map(common::other_binary).unwrap_or_default();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let listen = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let node = TestNode::start_wrapped(&repo, "bench", &wrapper, &listen, &["--owner", &address])?;
    let token = token_of(&login(&node, &owner, json!({"bench": ["read", "write"]}))?)?;
    let url = node.app_url().to_string();
    let pid = node.pid().context("no pid")?;
    for (method, write) in [("kb_setData", true), ("kb_getData", false)] {
        let cpu_before = common::cpu_seconds(pid)?;
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let workers: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (url, token) = (url.clone(), token.clone());
                std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                    let mut latencies = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let params = if write { json!(["bench", format!("c{client}/k{}", n % 64), n]) } else { json!(["bench", format!("c{client}/k{}", n % 64)]) };
                        let body = json!({"jsonrpc": "2.0", "id": n, "method": method, "params": params}).to_string();
                        let started = Instant::now();
                        let reply: Value = agent.post(&url).set("Authorization", &format!("Bearer {token}")).send_string(&body)?.into_json()?;
                        latencies.push(started.elapsed());
                        if reply.get("error").is_some() {
                            bail!("{method} failed: {reply}");
                        }
                        n += 1;
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.join().map_err(|_| anyhow::anyhow!("a client panicked"))??);
        }
        let cpu = common::cpu_seconds(pid)? - cpu_before;
        all.sort();
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        // The node's CPU per request does not depend on what else the machine runs, as
        // requests/s and latencies do.
        println!(
            "app API {method} [{label}]: {} clients, {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms ({} requests), node CPU {:.0} us/request",
            CLIENTS,
            all.len() as f64 / seconds as f64,
            at(0.50).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            all.len(),
            cpu * 1e6 / all.len().max(1) as f64,
        );
    }
    Ok(())
}

/// The app-level messaging figure (`scripts/bench.sh msg`; ignored in the test run):
/// `kb_sendMessage` from 16 concurrent clients of alice's node to bob's node on loopback, each
/// call answered once bob's node has stored the message (`delivered: true`). 400 messages, so
/// that bob's node's per-sender limit (50/s, burst 500) is not what is measured. Prints
/// messages/s and p50/p99 of the call.
#[test]
#[ignore = "a benchmark: scripts/bench.sh msg"]
fn bench_app_send_message_16_clients() -> anyhow::Result<()> {
    const CLIENTS: usize = 16;
    const MESSAGES: usize = 400;
    let dir = tempfile::tempdir()?;
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let (alice_address, bob_address) = (alice.address().to_checksum(), bob.address().to_checksum());
    // 401 calls stay within the per-core quota of 6,000 a minute.
    let a = TestNode::start(dir.path(), "a", &["--owner", &alice_address])?;
    let b = TestNode::start(dir.path(), "b", &["--owner", &bob_address, "--peer", &a.tcp_addr()])?;
    let token = token_of(&login(&a, &alice, json!({"messages": ["read", "write"]}))?)?;
    login(&b, &bob, json!({"messages": ["read", "write"]}))?;
    // Warm up: node a learns bob's device key, node b catches up alice's core.
    wait_until("a first message delivered", Duration::from_secs(60), || {
        let reply = call(&a, Some(&token), "kb_sendMessage", json!([bob_address, "warm-up"]))?;
        Ok(reply["result"]["delivered"] == true)
    })?;
    let url = a.app_url().to_string();
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (url, token, to) = (url.clone(), token.clone(), bob_address.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                let mut latencies = Vec::new();
                for n in (client..MESSAGES).step_by(CLIENTS) {
                    let body = json!({"jsonrpc": "2.0", "id": n, "method": "kb_sendMessage", "params": [to, format!("message {n}")]}).to_string();
                    let t0 = Instant::now();
                    let reply: Value = agent.post(&url).set("Authorization", &format!("Bearer {token}")).send_string(&body)?.into_json()?;
                    latencies.push(t0.elapsed());
                    if reply["result"]["delivered"] != true {
                        bail!("kb_sendMessage did not deliver: {reply}");
                    }
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.join().map_err(|_| anyhow::anyhow!("a client panicked"))??);
    }
    let elapsed = started.elapsed();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "app API kb_sendMessage: {CLIENTS} clients, {} messages delivered to another node in {:.2} s: {:.0} messages/s, p50 {:.2} ms, p99 {:.2} ms",
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}
