//! Calls to the app API (`kb_*`) as a web app makes them: an `Origin`, a bearer token, and
//! a sign-in signed by a wallet the test holds (the node never sees its key).

use std::time::Duration;

use anyhow::{bail, Context};
use kubelt_protocol::core::DevWallet;
use serde_json::{json, Value};

use super::TestNode;

/// The origin the test app signs in for.
pub const ORIGIN: &str = "https://notes.example";

/// Calls `method` on the app API of `node`; returns the whole reply (result or error).
pub fn app_call(node: &TestNode, token: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut request = agent.post(node.app_url()).set("Content-Type", "application/json").set("Origin", ORIGIN);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.send_string(&body) {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(_, r)) => Ok(r.into_json().unwrap_or(Value::Null)),
        Err(e) => Err(e.into()),
    }
}

/// Calls a method that must succeed; returns its result.
pub fn app_ok(node: &TestNode, token: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
    let reply = app_call(node, token, method, params)?;
    match reply.get("error") {
        Some(error) => bail!("{method} failed: {error}"),
        None => Ok(reply["result"].clone()),
    }
}

/// Signs `wallet` in on `node` for `capabilities` (`{"ns": ["read","write"]}`); returns the
/// token.
pub fn app_login(node: &TestNode, wallet: &DevWallet, capabilities: Value) -> anyhow::Result<String> {
    let address = wallet.address().to_checksum();
    let started = app_ok(node, None, "kb_getNonce", json!([address, capabilities]))?;
    let message = started["message"].as_str().context("no message")?;
    let signature = format!("0x{}", hex::encode(wallet.sign(message)?));
    let verified = app_ok(node, None, "kb_verifyNonce", json!({"nonce": started["nonce"], "signature": signature}))?;
    verified["token"].as_str().map(String::from).context("no token")
}
