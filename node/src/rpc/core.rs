//! The core methods: follow, submit owner statements, set/get values, list cores, the texts an
//! owner signs, and `core_subscribe` for the changes applied to cores (WebSocket).

use futures::stream::{BoxStream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use kubelt_protocol::core::private::unlock_message;
use kubelt_protocol::core::{delegation_message, owner_statement, parse_signature, Address};
use kubelt_protocol::node::NodeEvent;

use super::registry::{string, to_value, Auth, Ctx, Kind, Method, Namespace, Param, Params};
use super::{code, RpcError};

const STRING: &str = r#"{"type":"string"}"#;

/// The notification method of `core_subscribe`.
const NOTIFICATION: &str = "core_subscription";

pub static NAMESPACE: Namespace = Namespace {
    name: "core",
    summary: "Cores: owner statements, replicas, values, and subscriptions to their changes.",
    methods: &[
        Method {
            name: "core_delegationMessage",
            summary: "The SIWE (EIP-4361) text an owner signs to let a node key write to their core.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the owner's Ethereum address (the core id)" },
                Param { name: "peer", schema: STRING, required: false, summary: "peer id to authorize (default: this node)" },
                Param { name: "namespaces", schema: STRING, required: false, summary: "comma-separated namespaces, or * (default)" },
                Param { name: "expires", schema: STRING, required: false, summary: "validity, e.g. 30d (default), 12h" },
            ],
            result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(delegation(ctx, p)),
        },
        Method {
            name: "core_revocationMessage",
            summary: "The text an owner signs to revoke a node key (the key's changes made so far stay).",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the core" },
                Param { name: "peer", schema: STRING, required: true, summary: "peer id to revoke" },
            ],
            result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    let peer = peer(&p)?.ok_or_else(|| RpcError::invalid_params("missing param 'peer'"))?;
                    let message = ctx.state.client.cores().revocation_message(core, peer).await.map_err(RpcError::core)?;
                    Ok(json!({ "message": message }))
                })
            },
        },
        Method {
            name: "core_submit",
            summary: "Verifies an owner-signed delegation (for this node) or revocation and applies it.",
            params: &[
                Param { name: "message", schema: STRING, required: true, summary: "the signed text, exactly" },
                Param { name: "signature", schema: STRING, required: true, summary: "0x-hex EIP-191 signature (65 bytes)" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let statement = owner_statement(string(&p, "message")?, string(&p, "signature")?)
                        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
                    to_value(ctx.state.client.cores().submit(statement).await.map_err(RpcError::core)?)
                })
            },
        },
        Method {
            name: "core_follow",
            summary: "Holds a replica of a core without write rights.",
            params: &[Param { name: "address", schema: STRING, required: true, summary: "the core" }],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(async move { to_value(ctx.state.client.cores().follow(address(&p)?).await.map_err(RpcError::core)?) }),
        },
        Method {
            name: "core_set",
            summary: "Writes a JSON value at namespace/path; returns once the change is on disk.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the core" },
                Param { name: "namespace", schema: STRING, required: true, summary: "top-level namespace" },
                Param { name: "path", schema: STRING, required: true, summary: "a/b/c inside the namespace" },
                Param { name: "value", schema: r#"{}"#, required: true, summary: "any JSON value" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    let value = p.get("value").cloned().ok_or_else(|| RpcError::invalid_params("missing param 'value'"))?;
                    let (namespace, path) = (string(&p, "namespace")?.to_string(), string(&p, "path")?.to_string());
                    to_value(ctx.state.client.cores().set(core, namespace, path, value).await.map_err(RpcError::core)?)
                })
            },
        },
        Method {
            name: "core_get",
            summary: "Reads the JSON value at namespace/path (the whole namespace without path). Private values are decrypted; without the key the answer is error -32016 (encrypted), a tampered one -32017; inside a larger value such leaves read as {\"$encrypted\": \"no key\" | \"undecryptable\"}.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the core" },
                Param { name: "namespace", schema: STRING, required: true, summary: "top-level namespace" },
                Param { name: "path", schema: STRING, required: false, summary: "a/b/c inside the namespace" },
            ],
            result: r#"{}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    let path = p.get("path").and_then(Value::as_str).unwrap_or("").to_string();
                    ctx.state.client.cores().get(core, string(&p, "namespace")?.to_string(), path).await.map_err(RpcError::core)
                })
            },
        },
        Method {
            name: "core_private",
            summary: "Declares a namespace private (a signed change of that namespace): values written there from now on are encrypted before they enter a change; core_get decrypts them on nodes that hold the core's data key and answers error -32016 (encrypted) elsewhere.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the core" },
                Param { name: "namespace", schema: STRING, required: true, summary: "a namespace this node's delegation covers" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    to_value(ctx.state.client.cores().private(core, string(&p, "namespace")?.to_string()).await.map_err(RpcError::core)?)
                })
            },
        },
        Method {
            name: "core_unlockMessage",
            summary: "The text the owner signs (personal_sign) to unlock the core's private data on a node; wallets sign it deterministically, and the key is derived from the signature.",
            params: &[Param { name: "address", schema: STRING, required: true, summary: "the core" }],
            result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |_, p| Box::pin(async move { Ok(json!({ "message": unlock_message(&address(&p)?) })) }),
        },
        Method {
            name: "core_unlock",
            summary: "Unlocks the core's private data on this node with the owner's signature of core_unlockMessage (remembered across restarts); a node that writes the core then shares the keys with the owner's devices.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the core" },
                Param { name: "signature", schema: STRING, required: true, summary: "0x-hex EIP-191 signature (65 bytes)" },
            ],
            result: r#"{"type":"object","properties":{"core":{"type":"string"},"keys":{"type":"integer"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    let signature = parse_signature(string(&p, "signature")?).map_err(|e| RpcError::invalid_params(e.to_string()))?;
                    to_value(ctx.state.client.cores().unlock(core, signature).await.map_err(RpcError::core)?)
                })
            },
        },
        Method {
            name: "core_ls",
            summary: "Cores held, with heads, change counts and replica counts.",
            params: &[],
            result: r#"{"type":"array"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { to_value(ctx.state.client.cores().list().await.map_err(RpcError::node)?) }),
        },
        Method {
            name: "core_heads",
            summary: "The heads of a core.",
            params: &[Param { name: "address", schema: STRING, required: true, summary: "the core" }],
            result: r#"{"type":"array","items":{"type":"string"}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = address(&p)?;
                    let summary = ctx.state.client.cores().summary(core).await.map_err(RpcError::core)?;
                    Ok(json!(summary.heads))
                })
            },
        },
        Method {
            name: "core_subscribe",
            summary: "Notifies every change applied to a core from now on (local writes, gossip, catch-up): \
                      {core, applied: [change hashes]}. Without address, every core this node holds.",
            params: &[Param { name: "address", schema: STRING, required: false, summary: "the core (default: every core)" }],
            result: r#"{"type":"string","description":"the subscription id"}"#,
            auth: Auth::Admin,
            kind: Kind::Subscribe { notification: NOTIFICATION },
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = match p.get("address") {
                        None | Some(Value::Null) => None,
                        Some(_) => Some(address(&p)?),
                    };
                    let stream = updates(ctx.state.client.events(), core);
                    ctx.session()?.subscribe(NOTIFICATION, stream).map(Value::from)
                })
            },
        },
        Method {
            name: "core_unsubscribe",
            summary: "Ends a core_subscribe of this connection; false when there was no such subscription.",
            params: &[Param { name: "subscription", schema: STRING, required: true, summary: "the id core_subscribe returned" }],
            result: r#"{"type":"boolean"}"#,
            auth: Auth::Admin,
            kind: Kind::Unsubscribe,
            handler: |ctx, p| Box::pin(async move { Ok(Value::from(ctx.session()?.unsubscribe(string(&p, "subscription")?))) }),
        },
    ],
};

fn address(params: &Params) -> Result<Address, RpcError> {
    let text = string(params, "address")?;
    Address::parse(text).map_err(|e| RpcError::invalid_params(format!("invalid address '{text}': {e}")))
}

fn peer(params: &Params) -> Result<Option<libp2p::PeerId>, RpcError> {
    match params.get("peer") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => text.parse().map(Some).map_err(|e| RpcError::invalid_params(format!("invalid peer id '{text}': {e}"))),
        Some(_) => Err(RpcError::invalid_params("param 'peer' must be a string")),
    }
}

async fn delegation(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let core = address(&p)?;
    let peer = match peer(&p)? {
        Some(peer) => peer,
        None => ctx.state.client.info().await.map_err(RpcError::node)?.peer_id.parse().map_err(RpcError::node)?,
    };
    let namespaces_text = p.get("namespaces").and_then(Value::as_str).unwrap_or("*");
    let namespaces: Vec<&str> = namespaces_text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let expires = parse_duration(p.get("expires").and_then(Value::as_str).unwrap_or("30d")).map_err(RpcError::invalid_params)?;
    let now = time::OffsetDateTime::now_utc();
    delegation_expiry(now, expires).map_err(RpcError::invalid_params)?;
    let message = delegation_message(&core, &peer, &namespaces, expires, now).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    Ok(json!({ "message": message }))
}

/// The notifications of a `core_subscribe`: from the node's events, every update of `core`
/// (of every core when `None`) as `{core, applied}`. When the subscriber fell so far behind
/// that the node's buffer overwrote events it had not read, or the node stopped, the stream
/// ends with an error that says so: a subscriber never believes it saw every change when it
/// did not.
pub(super) fn updates(events: broadcast::Receiver<NodeEvent>, core: Option<Address>) -> BoxStream<'static, Result<Value, RpcError>> {
    futures::stream::unfold(Some(events), move |receiver| async move {
        let mut receiver = receiver?;
        loop {
            let ended = match receiver.recv().await {
                Ok(NodeEvent::CoreUpdated(update)) if core.is_none_or(|core| core == update.core) => {
                    let item = json!({ "core": update.core.to_checksum(), "applied": update.applied });
                    return Some((Ok(item), Some(receiver)));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    format!("subscription ended: it fell {missed} events behind the node; re-read the cores and subscribe again")
                }
                Err(broadcast::error::RecvError::Closed) => "subscription ended: the node stopped".to_string(),
            };
            return Some((Err(RpcError::new(code::SUBSCRIPTION_ENDED, ended)), None));
        }
    })
    .boxed()
}

/// Parses `30d`, `12h`, `15m`, `90s`, `2w` (a bare number is seconds). The number comes from
/// the caller, so the arithmetic is checked: an absurd count is an error, never a panic.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("invalid duration '{text}' (use e.g. 30d, 12h, 15m, 90s)"))?;
    let seconds: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("invalid duration unit in '{text}' (use s, m, h, d or w)")),
    };
    if n == 0 {
        return Err(format!("duration '{text}' must be positive"));
    }
    let total = n.checked_mul(seconds).ok_or_else(|| format!("duration '{text}' is too long"))?;
    Ok(std::time::Duration::from_secs(total))
}

/// When a delegation made `now` for `expires_in` would expire. A SIWE message carries RFC 3339
/// times, whose years have four digits, so the expiry must fall before the year 10000; checked
/// here because adding an unchecked duration to a date panics.
pub fn delegation_expiry(now: time::OffsetDateTime, expires_in: std::time::Duration) -> Result<time::OffsetDateTime, String> {
    let too_long = || format!("an expiry {}s from now is past the year 9999, the latest a SIWE message can name; give a shorter --expires", expires_in.as_secs());
    let expires_in = time::Duration::try_from(expires_in).map_err(|_| too_long())?;
    match now.checked_add(expires_in) {
        Some(expiry) if expiry.year() <= 9999 => Ok(expiry),
        _ => Err(too_long()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(core: Address, hash: &str) -> NodeEvent {
        NodeEvent::CoreUpdated(kubelt_protocol::node::CoreUpdate { core, applied: vec![hash.to_string()] })
    }

    #[tokio::test]
    async fn a_subscription_gets_its_core_only_and_ends_with_an_error_when_it_falls_behind() {
        let (sender, receiver) = broadcast::channel(4);
        let mine = Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed").unwrap();
        let other = Address::parse("0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359").unwrap();
        let mut stream = updates(receiver, Some(mine));
        sender.send(update(other, "aa")).unwrap();
        sender.send(update(mine, "bb")).unwrap();
        let item = stream.next().await.unwrap().unwrap();
        assert_eq!(item, json!({ "core": mine.to_checksum(), "applied": ["bb"] }));
        // Six more than the buffer holds, unread: the subscriber must hear that it missed some.
        for i in 0..10 {
            sender.send(update(mine, &format!("{i:02x}"))).unwrap();
        }
        let error = stream.next().await.unwrap().unwrap_err();
        assert_eq!(error.code, code::SUBSCRIPTION_ENDED);
        assert!(error.message.contains("behind"), "{}", error.message);
        assert!(stream.next().await.is_none());

        let (sender, receiver) = broadcast::channel(4);
        let mut every = updates(receiver, None);
        // Other events of the node are not core changes.
        sender.send(NodeEvent::PeerConnected { peer: libp2p::PeerId::random() }).unwrap();
        sender.send(update(other, "cc")).unwrap();
        assert_eq!(every.next().await.unwrap().unwrap()["core"], other.to_checksum());
        drop(sender);
        assert!(every.next().await.unwrap().unwrap_err().message.contains("node stopped"));
    }

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("30d").unwrap(), std::time::Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("90").unwrap(), std::time::Duration::from_secs(90));
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("0h").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5d").is_err());
        let err = parse_duration("213503982334601w").unwrap_err();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn an_expiry_past_the_year_9999_is_an_error_not_a_panic() {
        let now = time::macros::datetime!(2025-01-01 00:00 UTC);
        let thousand_years = std::time::Duration::from_secs(1000 * 366 * 86_400);
        assert_eq!(delegation_expiry(now, thousand_years).map(|t| t.year()), Ok(3027));
        for absurd in [std::time::Duration::from_secs(8000 * 366 * 86_400), std::time::Duration::from_secs(u64::MAX), std::time::Duration::MAX] {
            let err = delegation_expiry(now, absurd).unwrap_err();
            assert!(err.contains("year 9999"), "{err}");
        }
    }
}
