//! The app API's messaging (issue 13): `kb_sendMessage`, `kb_listMessages`, and
//! `kb_subscribe("messages")` (a branch of `kb_subscribe` in [`super::kb`], whose stream is
//! [`subscription`]). Each calls the node's [`MsgClient`](kubelt_protocol::node::MsgClient) as
//! the signed-in core, like the admin's `msg_*` methods do for any core this node writes.
//!
//! The capability is `messages` in the login's capabilities: `["read"]` lists and subscribes,
//! `["read","write"]` also sends. It is checked on every call (here, against the token the
//! dispatch verified). Since the login's written names are also the delegation of this node's
//! key, `messages` is a namespace of the core as well: an app allowed to send may also keep its
//! own state there with `kb_setData`. Texts open only on a node that is one of the core's
//! devices, i.e. that some login (or `kubelt core submit`) let write the core; with only
//! `["read"]` logins a node lists messages with `text: null`.


use futures::stream::{BoxStream, StreamExt};
use serde_json::Value;
use tokio::sync::broadcast;

use kubelt_protocol::core::Address;
use kubelt_protocol::msg::envelope::MAX_TEXT;
use kubelt_protocol::node::{Client, MsgError, NodeEvent};

use super::app::code as app_code;
use super::registry::{parse_param, string, to_value, Auth, Capability, Ctx, Kind, Method, Namespace, Param, Params};
use super::{code, RpcError};

/// The capability (and namespace) that grants messaging to an app.
pub const CAPABILITY: &str = "messages";



/// The app's messaging methods (a second table of the `kb` namespace).
pub static NAMESPACE: Namespace = Namespace {
    name: "kb",
    summary: "Apps: end-to-end encrypted messages of the signed-in core (capability 'messages').",
    methods: &[
        Method {
            name: "kb_sendMessage",
            summary: "Sends a text from the signed-in core to another core: encrypted to each of the recipient's devices, \
                      signed by this node under the login's delegation, delivered to a replica of the recipient or kept \
                      in the outbox until one is online (7 days). Needs {\"messages\": [\"read\",\"write\"]}. Errors: \
                      -32040 no messages write capability, -32022 text over 64 KiB, -32020 no device key of the \
                      recipient known yet (retry), -32023 a replica of the recipient refused it, -32012 this node's key \
                      was revoked, -32011 this node holds no delegation of the core.",
            params: &[
                Param { name: "to", schema: r#"{"type":"string"}"#, required: true, summary: "the recipient core (0x address)" },
                Param { name: "text", schema: r#"{"type":"string"}"#, required: true, summary: "the message, at most 64 KiB of UTF-8" },
            ],
            result: r#"{"type":"object","properties":{"id":{"type":"string"},"to":{"type":"string"},"delivered":{"type":"boolean"}}}"#,
            auth: Auth::App(Capability::Write),
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(send(ctx, p)),
        },
        Method {
            name: "kb_listMessages",
            summary: "The messages of the signed-in core's inbox on this node, oldest first: {id, from, to, sent_at, \
                      received_at, text, read}; text is null where this node is not one of the core's devices. Needs \
                      {\"messages\": [\"read\"]}. Errors: -32040 no messages capability, -32010 this node does not \
                      host the core's inbox.",
            params: &[Param {
                name: "options",
                schema: r#"{"type":"object","properties":{"since":{"type":"integer"}}}"#,
                required: false,
                summary: "since: only messages received after this time (unix ms)",
            }],
            result: r#"{"type":"array","items":{"type":"object","properties":{"id":{"type":"string"},"from":{"type":"string"},"to":{"type":"string"},"sent_at":{"type":"integer"},"received_at":{"type":"integer"},"text":{"type":["string","null"]},"read":{"type":"boolean"}}}}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(list(ctx, p)),
        },
    ],
};

/// The signed-in core, when the checked token grants `wanted` on messages.
fn messages_grant(ctx: &Ctx, wanted: Capability) -> Result<Address, RpcError> {
    let grant = ctx.grant()?;
    if grant.claims.capability(CAPABILITY) < Some(wanted) {
        let what = match wanted {
            Capability::Read => "read messages",
            Capability::Write => "send messages",
        };
        return Err(RpcError::new(
            app_code::CAPABILITY_MISSING,
            format!("the token does not let the app {what}: sign in with the capability {{\"messages\": [\"read\",\"write\"]}} (or [\"read\"] to read)"),
        ));
    }
    Ok(grant.core)
}

async fn send(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let from = messages_grant(&ctx, Capability::Write)?;
    let to: Address = parse_param(&p, "to")?;
    let text = string(&p, "text")?.as_bytes().to_vec();
    if text.len() > MAX_TEXT {
        return Err(RpcError::new(code::MSG_TOO_LARGE, format!("the text is {} bytes; a message holds at most {MAX_TEXT}", text.len())));
    }
    to_value(ctx.state.client.msg().send(from, to, text, super::msg::SEND_WAIT).await.map_err(super::msg::error)?)
}

async fn list(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let core = messages_grant(&ctx, Capability::Read)?;
    let since = match p.get("options") {
        None | Some(Value::Null) => None,
        Some(Value::Object(options)) => super::msg::since_value(options.get("since"), "options.since")?,
        Some(_) => return Err(RpcError::invalid_params("param 'options' must be an object: {since?}")),
    };
    to_value(ctx.state.client.msg().inbox(core, since).await.map_err(super::msg::error)?)
}

/// The notifications of `kb_subscribe("messages")`: every message that enters `core`'s inbox
/// on this node from now on (from its sender or from another replica), as `kb_listMessages`
/// lists it. It ends with -32006 when the subscriber fell behind the node or the node stopped.
pub fn subscription(client: Client, core: Address) -> BoxStream<'static, Result<Value, RpcError>> {
    let events = client.events();
    futures::stream::unfold(Some((client, events)), move |state| async move {
        let (client, mut events) = state?;
        loop {
            let ended = match events.recv().await {
                Ok(NodeEvent::MessageReceived { core: to, id, .. }) if to == core => match client.msg().get(id).await {
                    Ok(message) => return Some((to_value(message), Some((client, events)))),
                    // Deleted (or removed by a revocation) before it could be read: nothing to show.
                    Err(MsgError::NotFound(_)) => continue,
                    Err(e) => return Some((Err(super::msg::error(e)), None)),
                },
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    format!("subscription ended: it fell {missed} events behind the node; list the messages and subscribe again")
                }
                Err(broadcast::error::RecvError::Closed) => "subscription ended: the node stopped".to_string(),
            };
            return Some((Err(RpcError::new(code::SUBSCRIPTION_ENDED, ended)), None));
        }
    })
    .boxed()
}
