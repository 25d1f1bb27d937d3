//! The messaging methods: `msg_send`, `msg_inbox`, `msg_read`, `msg_delete`, `msg_outbox`.
//! Thin: each calls the node's [`MsgClient`](kubelt_protocol::node::MsgClient), which an app
//! API can wrap the same way (`kb_sendMessage`, `kb_listMessages`).

use std::time::Duration;

use serde_json::Value;

use kubelt_protocol::core::Address;
use kubelt_protocol::msg::MessageId;
use kubelt_protocol::node::MsgError;

use super::registry::{parse_param, string, to_value, Auth, Kind, Method, Namespace, Param, Params};
use super::{code, RpcError};

const STRING: &str = r#"{"type":"string"}"#;
const MESSAGE: &str = r#"{"type":"object","properties":{"id":{"type":"string"},"from":{"type":"string"},"to":{"type":"string"},"sent_at":{"type":"integer"},"received_at":{"type":"integer"},"text":{"type":["string","null"]},"read":{"type":"boolean"}}}"#;

const MESSAGES: &str = r#"{"type":"array","items":{"type":"object","properties":{"id":{"type":"string"},"from":{"type":"string"},"to":{"type":"string"},"sent_at":{"type":"integer"},"received_at":{"type":"integer"},"text":{"type":["string","null"]},"read":{"type":"boolean"}}}}"#;

/// How long `msg_send` and `kb_sendMessage` wait for a replica to take the message before they
/// answer "queued" (the message then waits in the outbox).
pub(super) const SEND_WAIT: Duration = Duration::from_secs(5);

/// The messaging methods.
pub static NAMESPACE: Namespace = Namespace {
    name: "msg",
    summary: "End-to-end encrypted messages between cores: send, the inbox, the outbox.",
    methods: &[
        Method {
            name: "msg_send",
            summary: "Encrypts a text to every device key of the recipient core, signs it as the sender core (this node must write it) and delivers it to a replica of the recipient, or keeps it in the outbox until one is online (7 days).",
            params: &[
            Param { name: "from", schema: STRING, required: true, summary: "sender core (0x address)" },
            Param { name: "to", schema: STRING, required: true, summary: "recipient core (0x address)" },
            Param { name: "text", schema: STRING, required: true, summary: "the message, at most 64 KiB of UTF-8" },
        ],
            result: r#"{"type":"object","properties":{"id":{"type":"string"},"to":{"type":"string"},"delivered":{"type":"boolean"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let from: Address = parse_param(&p, "from")?;
                    let to: Address = parse_param(&p, "to")?;
                    let text = string(&p, "text")?.as_bytes().to_vec();
                    to_value(ctx.state.client.msg().send(from, to, text, SEND_WAIT).await.map_err(error)?)
                })
            },
        },
        Method {
            name: "msg_inbox",
            summary: "The messages of a core's inbox on this node, oldest first; text is null where this node is not one of the recipient's devices.",
            params: &[
            Param { name: "address", schema: STRING, required: true, summary: "the recipient core" },
            Param { name: "since", schema: r#"{"type":"integer"}"#, required: false, summary: "only messages received after this time (unix ms)" },
        ],
            result: MESSAGES,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core: Address = parse_param(&p, "address")?;
                    to_value(ctx.state.client.msg().inbox(core, since(&p)?).await.map_err(error)?)
                })
            },
        },
        Method {
            name: "msg_read",
            summary: "One message, marked read on this node.",
            params: &[Param { name: "id", schema: STRING, required: true, summary: "message id (32 hex digits)" }],
            result: MESSAGE,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let id: MessageId = parse_param(&p, "id")?;
                    to_value(ctx.state.client.msg().read(id).await.map_err(error)?)
                })
            },
        },
        Method {
            name: "msg_delete",
            summary: "Deletes a message on this node; no replica or replay brings it back here.",
            params: &[Param { name: "id", schema: STRING, required: true, summary: "message id (32 hex digits)" }],
            result: r#"{"type":"null"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let id: MessageId = parse_param(&p, "id")?;
                    ctx.state.client.msg().delete(id).await.map_err(error)?;
                    Ok(Value::Null)
                })
            },
        },
        Method {
            name: "msg_outbox",
            summary: "Messages this node sent that no replica of their recipient has taken yet.",
            params: &[],
            result: r#"{"type":"array","items":{"type":"object","properties":{"id":{"type":"string"},"to":{"type":"string"}}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let _ = p;
                    to_value(ctx.state.client.msg().outbox().await.map_err(error)?)
                })
            },
        },
    ],
};

/// The optional `since` param (unix ms).
fn since(p: &Params) -> Result<Option<i64>, RpcError> {
    since_value(p.get("since"), "param 'since'")
}

/// An optional `since` (unix ms) named `name` in refusals; shared with `kb_listMessages`.
pub(super) fn since_value(value: Option<&Value>, name: &str) -> Result<Option<i64>, RpcError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| RpcError::invalid_params(format!("{name} must be an integer (unix ms)"))),
    }
}

/// A failed messaging command, with the code of its kind.
pub fn error(error: MsgError) -> RpcError {
    let code = match &error {
        MsgError::NotHeld(_) | MsgError::NoInbox(_) => code::CORE_NOT_HELD,
        MsgError::NotWritable(_) => code::CORE_NOT_WRITABLE,
        MsgError::NoDeviceKeys { .. } => code::MSG_NO_DEVICE_KEYS,
        MsgError::NotFound(_) => code::MSG_NOT_FOUND,
        MsgError::Seal(kubelt_protocol::msg::SealError::TooLarge(_)) => code::MSG_TOO_LARGE,
        MsgError::Seal(_) => code::INVALID_PARAMS,
        MsgError::Revoked(_) => code::CORE_REVOKED,
        MsgError::Refused { .. } => code::MSG_REFUSED,
        _ => code::NODE_ERROR,
    };
    RpcError::new(code, error.to_string())
}
