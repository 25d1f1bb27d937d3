//! The app API's methods (`kb_*`, the names of the original Kubelt Core API): sign in with a
//! wallet, read and write the signed-in core, and subscribe to its changes. Served only on the
//! app endpoint ([`super::registry::APP`]); see [`super::app`] for tokens and quotas.

use futures::stream::{BoxStream, StreamExt};
use serde_json::{json, Value};

use kubelt_protocol::core::private::unlock_message;
use kubelt_protocol::core::{delegation, login_message, owner_statement, Address, DelegationError, Login, LoginRequest};
use kubelt_protocol::node::Client;

use super::app::{self, code as app_code, App, AppCaller};
use super::registry::{string, to_value, Auth, Capability, Caller, Ctx, Kind, Method, Namespace, Param, Params};
use super::{code, Gate, RpcError};

const STRING: &str = r#"{"type":"string"}"#;
const NOTIFICATION: &str = "kb_subscription";
const DATA: &str = r#"{"type":"object","properties":{"namespace":{"type":"string"},"path":{"type":"string"},"value":{}}}"#;
/// How long a login (token and delegation) lasts.
const LOGIN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

pub static NAMESPACE: Namespace = Namespace {
    name: "kb",
    summary: "Apps: sign in with a wallet, then read, write and watch the signed-in core.",
    methods: &[
        super::registry::DISCOVER,
        Method {
            name: "kb_ping",
            summary: "Answers \"pong\": the node is up.",
            params: &[],
            result: r#"{"const":"pong"}"#,
            auth: Auth::Public,
            kind: Kind::Call,
            handler: |_, _| Box::pin(async move { Ok(json!("pong")) }),
        },
        Method {
            name: "kb_getNonce",
            summary: "Starts a login: a single-use nonce (5 minutes) and the EIP-4361 message the wallet signs as is. \
                      Its domain is the app's origin (Origin, else Host); its written namespaces delegate this node's key.",
            params: &[
                Param { name: "address", schema: STRING, required: true, summary: "the wallet's Ethereum address (the core)" },
                Param {
                    name: "capabilities",
                    schema: r#"{"type":"object","additionalProperties":{"type":"array","items":{"enum":["read","write"]}}}"#,
                    required: true,
                    summary: "namespace -> [\"read\"] or [\"read\",\"write\"]",
                },
            ],
            result: r#"{"type":"object","properties":{"nonce":{"type":"string"},"message":{"type":"string"}}}"#,
            auth: Auth::Public,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(get_nonce(ctx, p)),
        },
        Method {
            name: "kb_verifyNonce",
            summary: "Completes a login: checks the wallet's EIP-191 signature of the message, submits the delegation \
                      (creating or following the core) and returns a token.",
            params: &[
                Param { name: "nonce", schema: STRING, required: true, summary: "the nonce kb_getNonce returned" },
                Param { name: "signature", schema: STRING, required: true, summary: "0x-hex personal_sign signature (65 bytes)" },
            ],
            result: r#"{"type":"object","properties":{"token":{"type":"string"},"expires":{"type":"integer"},"address":{"type":"string"},"capabilities":{"type":"object"}}}"#,
            auth: Auth::Public,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(verify_nonce(ctx, p)),
        },
        Method {
            name: "kb_logout",
            summary: "Revokes this call's token for good (also after a restart).",
            params: &[],
            result: r#"{"type":"boolean"}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, _| {
                Box::pin(async move {
                    app_of(&ctx)?.tokens.revoke(&ctx.grant()?.claims)?;
                    Ok(json!(true))
                })
            },
        },
        Method {
            name: "kb_getCoreAddresses",
            summary: "The addresses of the signed-in core: {eth: [address]}.",
            params: &[],
            result: r#"{"type":"object","properties":{"eth":{"type":"array","items":{"type":"string"}}}}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { Ok(json!({ "eth": [ctx.grant()?.core.to_checksum()] })) }),
        },
        Method {
            name: "kb_getData",
            summary: "Reads the JSON value at namespace/path of the core (the whole namespace without path).",
            params: &[
                Param { name: "namespace", schema: STRING, required: true, summary: "a namespace the token may read" },
                Param { name: "path", schema: STRING, required: false, summary: "a/b/c inside the namespace" },
            ],
            result: DATA,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let (namespace, path) = (string(&p, "namespace")?.to_string(), optional_path(&p)?);
                    let value = ctx.state.client.cores().get(ctx.grant()?.core, namespace.clone(), path.clone()).await.map_err(RpcError::core)?;
                    Ok(json!({ "namespace": namespace, "path": path, "value": value }))
                })
            },
        },
        Method {
            name: "kb_setData",
            summary: "Writes a JSON value at namespace/path: a signed change of this node's key that replicates like \
                      `kubelt core set`; returns once it is on disk.",
            params: &[
                Param { name: "namespace", schema: STRING, required: true, summary: "a namespace the token may write" },
                Param { name: "path", schema: STRING, required: true, summary: "a/b/c inside the namespace" },
                Param { name: "value", schema: r#"{}"#, required: true, summary: "any JSON value" },
            ],
            result: DATA,
            auth: Auth::App(Capability::Write),
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(set_data(ctx, p)),
        },
        Method {
            name: "kb_putObject",
            summary: "Stores bytes as IPFS content (pinned) and records CID, version, size and type at namespace/path; \
                      earlier versions stay readable.",
            params: &[
                Param { name: "namespace", schema: STRING, required: true, summary: "a namespace the token may write" },
                Param { name: "path", schema: STRING, required: true, summary: "a/b/c inside the namespace" },
                Param { name: "data", schema: STRING, required: true, summary: "the bytes, base64" },
                Param {
                    name: "options",
                    schema: r#"{"type":"object","properties":{"visibility":{"enum":["public","private"]},"contentType":{"type":"string"}}}"#,
                    required: false,
                    summary: "visibility (private: encrypted with the core's data key before it becomes blocks, kbobj1) and contentType",
                },
            ],
            result: r#"{"type":"object","properties":{"version":{"type":"integer"},"size":{"type":"integer"},"cid":{"type":"string"}}}"#,
            auth: Auth::App(Capability::Write),
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(super::objects::put(ctx, p)),
        },
        Method {
            name: "kb_getObject",
            summary: "Reads an object stored with kb_putObject: the latest version, or options.version.",
            params: &[
                Param { name: "namespace", schema: STRING, required: true, summary: "a namespace the token may read" },
                Param { name: "path", schema: STRING, required: true, summary: "a/b/c inside the namespace" },
                Param { name: "options", schema: r#"{"type":"object","properties":{"version":{"type":"integer"}}}"#, required: false, summary: "version (default: the latest)" },
            ],
            result: r#"{"type":"object","properties":{"data":{"type":"string"},"version":{"type":"integer"},"cid":{"type":"string"},"contentType":{"type":"string"}}}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(super::objects::get(ctx, p)),
        },
        Method {
            name: "kb_getUnlockMessage",
            summary: "The text the signed-in wallet signs (personal_sign) to unlock its core's private data on this node \
                      (the same as core_unlockMessage); wallets sign it deterministically.",
            params: &[],
            result: r#"{"type":"object","properties":{"message":{"type":"string"}}}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, _| Box::pin(async move { Ok(json!({ "message": unlock_message(&ctx.grant()?.core) })) }),
        },
        Method {
            name: "kb_unlock",
            summary: "Unlocks the signed-in core's private data on this node with the wallet's signature of \
                      kb_getUnlockMessage (remembered across restarts): a hosting node can then serve the person's \
                      private values and objects to their apps; a node never given it cannot.",
            params: &[Param { name: "signature", schema: STRING, required: true, summary: "0x-hex personal_sign signature (65 bytes)" }],
            result: r#"{"type":"object","properties":{"core":{"type":"string"},"keys":{"type":"integer"}}}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Call,
            handler: |ctx, p| {
                Box::pin(async move {
                    let core = ctx.grant()?.core;
                    let signature = delegation::parse_signature(string(&p, "signature")?).map_err(|e| RpcError::invalid_params(e.to_string()))?;
                    to_value(ctx.state.client.cores().unlock(core, signature).await.map_err(RpcError::core)?)
                })
            },
        },
        Method {
            name: "kb_subscribe",
            summary: "Notifies every change to a namespace of the core from now on (this app, another app, another \
                      replica): {namespace, value, applied}, the namespace's value after the change. \
                      kb_subscribe(\"messages\") (capability messages: read) notifies instead every message that enters \
                      the core's inbox on this node, as kb_listMessages lists it.",
            params: &[Param { name: "namespace", schema: STRING, required: true, summary: "a namespace the token may read" }],
            result: r#"{"type":"string","description":"the subscription id"}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Subscribe { notification: NOTIFICATION },
            handler: |ctx, p| {
                Box::pin(async move {
                    let namespace = string(&p, "namespace")?.to_string();
                    let grant = ctx.grant()?;
                    let stream = if namespace == super::kb_msg::CAPABILITY {
                        super::kb_msg::subscription(ctx.state.client.clone(), grant.core)
                    } else {
                        changes(ctx.state.client.clone(), grant.core, namespace)
                    };
                    let Gate::App(app) = &ctx.state.gate else { return Err(RpcError::new(code::INTERNAL_ERROR, "kb_subscribe off the app endpoint")) };
                    let stream = while_token_valid(stream, app.clone(), grant.claims.clone());
                    ctx.session()?.subscribe(NOTIFICATION, stream).map(Value::from)
                })
            },
        },
        Method {
            name: "kb_unsubscribe",
            summary: "Ends a kb_subscribe of this connection; false when there was no such subscription.",
            params: &[Param { name: "subscription", schema: STRING, required: true, summary: "the id kb_subscribe returned" }],
            result: r#"{"type":"boolean"}"#,
            auth: Auth::App(Capability::Read),
            kind: Kind::Unsubscribe,
            handler: |ctx, p| Box::pin(async move { Ok(Value::from(ctx.session()?.unsubscribe(string(&p, "subscription")?))) }),
        },
    ],
};

/// `kb_setData`: on a hosted node, refused when the core would pass its bytes quota.
async fn set_data(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let (namespace, path) = (string(&p, "namespace")?.to_string(), string(&p, "path")?.to_string());
    let value = p.get("value").cloned().ok_or_else(|| RpcError::invalid_params("missing param 'value'"))?;
    let core = ctx.grant()?.core;
    let cores = ctx.state.client.cores();
    let written = match app::core_byte_limit(&ctx.state.gate, &ctx.state.store, &core)? {
        Some(limit) => cores.set_within(core, namespace.clone(), path.clone(), value.clone(), limit).await,
        None => cores.set(core, namespace.clone(), path.clone(), value.clone()).await,
    };
    written.map_err(RpcError::core)?;
    Ok(json!({ "namespace": namespace, "path": path, "value": value }))
}

fn app_of(ctx: &Ctx) -> Result<&App, RpcError> {
    match &ctx.state.gate {
        Gate::App(app) => Ok(app),
        Gate::Admin { .. } => Err(RpcError::new(code::INTERNAL_ERROR, "an app method on the admin endpoint")),
    }
}

fn app_caller(ctx: &Ctx) -> Result<&AppCaller, RpcError> {
    match &ctx.caller {
        Caller::App(caller) => Ok(caller),
        Caller::Admin => Err(RpcError::new(code::INTERNAL_ERROR, "an app method called with admin credentials")),
    }
}

fn optional_path(p: &Params) -> Result<String, RpcError> {
    match p.get("path") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(path)) => Ok(path.clone()),
        Some(_) => Err(RpcError::invalid_params("param 'path' must be a string")),
    }
}

/// `{namespace: ["read"] | ["read","write"]}` as (reads, writes).
fn parse_capabilities(value: Option<&Value>) -> Result<(Vec<String>, Vec<String>), RpcError> {
    let Some(Value::Object(map)) = value else {
        return Err(RpcError::invalid_params("param 'capabilities' must be an object: {namespace: [\"read\"] or [\"read\",\"write\"]}"));
    };
    if map.is_empty() || map.len() > 64 {
        return Err(RpcError::invalid_params("param 'capabilities' must name 1 to 64 namespaces"));
    }
    let (mut reads, mut writes) = (vec![], vec![]);
    for (namespace, rights) in map {
        let rights: Vec<&str> = rights.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        match rights.as_slice() {
            ["read"] => reads.push(namespace.clone()),
            ["read", "write"] | ["write", "read"] | ["write"] => writes.push(namespace.clone()),
            _ => return Err(RpcError::invalid_params(format!("capabilities of '{namespace}' must be [\"read\"] or [\"read\",\"write\"]"))),
        }
    }
    Ok((reads, writes))
}

async fn get_nonce(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let (app, caller) = (app_of(&ctx)?, app_caller(&ctx)?);
    let text = string(&p, "address")?;
    let address = Address::parse(text).map_err(|e| RpcError::invalid_params(format!("invalid address '{text}': {e}")))?;
    let (reads, writes) = parse_capabilities(p.get("capabilities"))?;
    let domain = caller.domain.clone().ok_or_else(|| {
        RpcError::new(app_code::NO_ORIGIN, "the request names no app origin to sign in for: send it from a web page (Origin) or with a Host header")
    })?;
    app.settings.may_log_in(&address)?;
    app.limits.login(caller.ip)?;
    let peer = app.tokens.audience().parse().map_err(RpcError::node)?;
    let nonce = delegation::nonce();
    let (read_refs, write_refs): (Vec<&str>, Vec<&str>) = (reads.iter().map(String::as_str).collect(), writes.iter().map(String::as_str).collect());
    let request = LoginRequest { domain: &domain, owner: address, peer, reads: &read_refs, writes: &write_refs, expires_in: LOGIN_LIFETIME, nonce: &nonce };
    let message = login_message(&request, time::OffsetDateTime::now_utc()).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    app.logins.issue(nonce.clone(), address, domain, message.clone())?;
    Ok(json!({ "nonce": nonce, "message": message }))
}

async fn verify_nonce(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let app = app_of(&ctx)?;
    let (nonce, signature) = (string(&p, "nonce")?, string(&p, "signature")?);
    let pending = app.logins.take(nonce)?;
    let statement = owner_statement(&pending.message, signature).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let login = Login::verify(&statement, &pending.domain).map_err(|e| match e {
        DelegationError::SignedBySomeoneElse { signer, claimed } => RpcError::new(
            app_code::WRONG_SIGNER,
            format!("the login names {} but was signed by {}", claimed.to_checksum(), signer.to_checksum()),
        ),
        DelegationError::BadSignature | DelegationError::HighS => RpcError::new(app_code::WRONG_SIGNER, e.to_string()),
        other => RpcError::new(app_code::LOGIN_INVALID, other.to_string()),
    })?;
    if login.owner != pending.address || login.nonce != nonce {
        return Err(RpcError::new(app_code::LOGIN_INVALID, "the signed login is not the one issued for this nonce"));
    }
    let cores = ctx.state.client.cores();
    // Answered without loading any replica: a hosted node holds thousands of cores.
    let holding = cores.holding(Some(login.owner)).await.map_err(RpcError::node)?;
    let checksum = login.owner.to_checksum();
    if app.settings.hosted && !holding.holds && holding.held >= app.limits.quotas().cores {
        return Err(RpcError::new(
            app_code::QUOTA_EXCEEDED,
            format!("quota exceeded: this node hosts at most {} cores and is full", app.limits.quotas().cores),
        ));
    }
    if login.delegation.is_some() {
        cores.submit(statement).await.map_err(RpcError::core)?;
    } else if !holding.holds {
        cores.follow(login.owner).await.map_err(RpcError::core)?;
    }
    let reads: Vec<String> = login.reads.iter().cloned().collect();
    let writes: Vec<String> = match &login.writes {
        Some(delegation::Namespaces::All) => vec!["*".to_string()],
        Some(delegation::Namespaces::Only(set)) => set.iter().cloned().collect(),
        None => vec![],
    };
    let claims = app::token::Claims {
        sub: checksum.clone(),
        aud: app.tokens.audience().to_string(),
        iat: time::OffsetDateTime::now_utc().unix_timestamp(),
        exp: login.expires_at,
        jti: hex::encode(rand::random::<[u8; 16]>()),
        read: reads.clone(),
        write: writes.clone(),
        dom: login.domain.clone(),
    };
    let token = app.tokens.issue(&claims)?;
    Ok(json!({ "token": token, "expires": claims.exp, "address": checksum, "capabilities": app::capabilities_json(&reads, &writes) }))
}

/// A subscription lives no longer than its token: it ends with -32035 when the token expires,
/// and with -32036 at the first change after the token was revoked (`kb_logout`).
fn while_token_valid(
    stream: BoxStream<'static, Result<Value, RpcError>>,
    app: std::sync::Arc<App>,
    claims: app::token::Claims,
) -> BoxStream<'static, Result<Value, RpcError>> {
    let left = claims.exp.saturating_sub(time::OffsetDateTime::now_utc().unix_timestamp()).max(0);
    let expiry = futures::stream::once(tokio::time::sleep(std::time::Duration::from_secs(left as u64)))
        .map(|()| Err(RpcError::new(app_code::TOKEN_EXPIRED, "subscription ended: the token expired; sign in again")));
    let checked = stream.map(move |item| {
        if app.tokens.is_revoked(&claims.jti) {
            Err(RpcError::new(app_code::TOKEN_REVOKED, "subscription ended: the token was revoked (kb_logout)"))
        } else {
            item
        }
    });
    futures::stream::select(checked, expiry).boxed()
}

/// The notifications of a `kb_subscribe`: after every update of `core` (the stream of
/// `core_subscribe`, which ends with an error when the subscriber fell behind or the node
/// stopped), the namespace's value, re-read.
fn changes(client: Client, core: Address, namespace: String) -> BoxStream<'static, Result<Value, RpcError>> {
    super::core::updates(client.events(), Some(core))
        .then(move |update| {
            let (client, namespace) = (client.clone(), namespace.clone());
            async move {
                let applied = update?["applied"].take();
                let value = client.cores().get(core, namespace.clone(), String::new()).await.map_err(RpcError::core)?;
                Ok(json!({ "namespace": namespace, "value": value, "applied": applied }))
            }
        })
        .boxed()
}
