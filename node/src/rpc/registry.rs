//! The one place a JSON-RPC method exists: a row in its namespace's table.
//!
//! Each namespace (`node`, `content`, `core`, later the app API's `kb`) is a [`Namespace`]
//! whose rows hold everything about a method: its name, what it does, its params and result
//! (JSON schemas), who may call it ([`Auth`]), whether it is a subscription, and the handler
//! that runs it. `rpc.discover` is generated from the same rows, and dispatch finds a method by
//! name in them, so a method that is described but not implemented cannot be written: the
//! row does not compile without its handler. Adding a method is one row plus its handler.
//!
//! A [`Registry`] is the set of namespaces one endpoint serves (the admin API's is [`ADMIN`]);
//! the transports (`http.rs`, `ws.rs`) only parse requests and hand them to
//! [`Registry::dispatch`], which checks the caller's right and the params before the handler.

use futures::future::BoxFuture;
use serde_json::{json, Map, Value};

use super::{code, ws, ApiState, RpcError};

/// Named params, after positional ones were given their names.
pub type Params = Map<String, Value>;

/// What a handler returns: its result, later.
pub type Reply = BoxFuture<'static, Result<Value, RpcError>>;

/// A method's code: takes the call's context and its named params.
pub type Handler = fn(Ctx, Params) -> Reply;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone who reaches the endpoint (the app API's login, ping and `rpc.discover`).
    Public,
    /// The node's operator: the secret from `<repo>/api.cookie`.
    Admin,
    /// An app signed in with a wallet, with a token that grants this capability (on the
    /// `namespace` param when the method has one).
    App(Capability),
}

/// What an app token allows on a namespace of a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    Read,
    Write,
}

impl Auth {
    /// Whether `caller` may call a method with this requirement.
    fn permits(self, caller: &Caller) -> bool {
        match (self, caller) {
            (Auth::Public, _) => true,
            (Auth::Admin, Caller::Admin) => true,
            (Auth::Admin, Caller::App(_)) => false,
            (Auth::App(_), Caller::Admin) => false,
            // The token itself is checked on every call by the app gate (dispatch).
            (Auth::App(_), Caller::App(_)) => true,
        }
    }

    /// How `rpc.discover` names it.
    fn describe(self) -> &'static str {
        match self {
            Auth::Public => "public",
            Auth::Admin => "admin",
            Auth::App(Capability::Read) => "app:read",
            Auth::App(Capability::Write) => "app:write",
        }
    }
}

/// Who is calling, as the transport established it from the request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Presented the admin secret.
    Admin,
    /// A request to the app API: what it presented, checked call by call.
    App(super::app::AppCaller),
}

/// Whether a method answers once or opens a stream of notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain call: one request, one reply; over HTTP and WebSocket.
    Call,
    /// Returns a subscription id, then sends `notification` calls carrying it (WebSocket only).
    Subscribe { notification: &'static str },
    /// Ends a subscription of the same connection (WebSocket only).
    Unsubscribe,
}

/// One parameter of a method, for the OpenRPC document and for positional params.
pub struct Param {
    pub name: &'static str,
    /// JSON schema, as JSON text.
    pub schema: &'static str,
    pub required: bool,
    pub summary: &'static str,
}

/// One method: how `rpc.discover` describes it and the code that runs it.
pub struct Method {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: &'static [Param],
    /// JSON schema of the result, as JSON text.
    pub result: &'static str,
    pub auth: Auth,
    pub kind: Kind,
    pub handler: Handler,
}

/// The methods of one namespace, in one table.
pub struct Namespace {
    pub name: &'static str,
    /// What its methods are about, for the OpenRPC document's tags.
    pub summary: &'static str,
    pub methods: &'static [Method],
}

/// The namespaces one endpoint serves.
pub struct Registry {
    pub title: &'static str,
    pub description: &'static str,
    pub namespaces: &'static [&'static Namespace],
    /// The error codes its methods answer, for `rpc.discover`.
    pub errors: &'static [&'static [(i64, &'static str)]],
}

/// The admin API: the node's operator, with the cookie.
pub static ADMIN: Registry = Registry {
    title: "Kubelt node API",
    description: "Admin API of a kubelt node: JSON-RPC 2.0 over HTTP (POST /) and WebSocket (GET /). \
                  Every call needs 'Authorization: Bearer <secret from <repo>/api.cookie>' \
                  (on WebSocket also accepted as the access_token query parameter).",
    namespaces: &[&super::node::NAMESPACE, &super::content::NAMESPACE, &super::core::NAMESPACE, &super::msg::NAMESPACE],
    errors: &[code::ALL],
};

/// The app API: web apps signed in with the person's wallet (`kb_*`, issue 12).
pub static APP: Registry = Registry {
    title: "Kubelt app API",
    description: "App API of a kubelt node: JSON-RPC 2.0 over HTTP (POST /) and WebSocket (GET /). \
                  Sign in with kb_getNonce and kb_verifyNonce (SIWE, EIP-4361); then send the token as \
                  'Authorization: Bearer <token>' (on WebSocket also as the access_token query parameter).",
    namespaces: &[&super::kb::NAMESPACE, &super::kb_msg::NAMESPACE],
    errors: &[code::ALL, super::app::code::ALL],
};

/// `rpc.discover`: every endpoint's first row, describing that endpoint's own registry.
pub const DISCOVER: Method = Method {
    name: "rpc.discover",
    summary: "This API's OpenRPC document.",
    params: &[],
    result: r#"{"type":"object"}"#,
    auth: Auth::Public,
    kind: Kind::Call,
    handler: |ctx, _| Box::pin(async move { Ok(ctx.registry.openrpc()) }),
};

/// What a handler can reach during one call.
#[derive(Clone)]
pub struct Ctx {
    pub state: ApiState,
    pub registry: &'static Registry,
    pub caller: Caller,
    /// The WebSocket connection the call came on; `None` over HTTP.
    pub session: Option<ws::CallScope>,
    /// What the app's token grants, once checked (methods with [`Auth::App`]).
    pub grant: Option<std::sync::Arc<super::app::Grant>>,
}

impl Ctx {
    /// The context of a call to the endpoint of `state`, by `caller`.
    pub fn new(state: ApiState, caller: Caller, session: Option<ws::CallScope>) -> Ctx {
        Ctx { registry: state.registry, state, caller, session, grant: None }
    }

    /// The context of a call made with the admin secret.
    #[cfg(test)]
    pub fn admin(state: ApiState, session: Option<ws::CallScope>) -> Ctx {
        Ctx { state, registry: &ADMIN, caller: Caller::Admin, session, grant: None }
    }

    /// What the checked token grants; only methods with [`Auth::App`] have it.
    pub fn grant(&self) -> Result<&super::app::Grant, RpcError> {
        self.grant.as_deref().ok_or_else(|| RpcError::new(code::INTERNAL_ERROR, "an app method ran without a checked token"))
    }

    /// The WebSocket connection of this call; subscription methods only run over one.
    pub fn session(&self) -> Result<&ws::CallScope, RpcError> {
        self.session.as_ref().ok_or_else(needs_websocket)
    }
}

fn needs_websocket() -> RpcError {
    RpcError::new(
        code::NEEDS_WEBSOCKET,
        "subscriptions need a WebSocket connection: open GET / with 'Upgrade: websocket' and call it there",
    )
}

impl Registry {
    /// Every method, namespace by namespace.
    pub fn methods(&self) -> impl Iterator<Item = &'static Method> + '_ {
        self.namespaces.iter().flat_map(|ns| ns.methods.iter())
    }

    pub fn find(&self, name: &str) -> Option<&'static Method> {
        self.methods().find(|m| m.name == name)
    }

    /// Runs one call: finds the method, checks that the caller may call it over this
    /// transport, names its params and runs its handler.
    pub async fn dispatch(&'static self, mut ctx: Ctx, name: &str, params: Value) -> Result<Value, RpcError> {
        let Some(method) = self.find(name) else {
            return Err(RpcError::new(code::METHOD_NOT_FOUND, format!("method not found: {name}")));
        };
        if !method.auth.permits(&ctx.caller) {
            return Err(RpcError::new(
                code::UNAUTHORIZED,
                format!("{name} needs {} rights, which these credentials do not give", method.auth.describe()),
            ));
        }
        if method.kind != Kind::Call && ctx.session.is_none() {
            return Err(needs_websocket());
        }
        let params = named_params(method, params)?;
        if let (Auth::App(capability), Caller::App(caller), super::Gate::App(app)) = (method.auth, &ctx.caller, &ctx.state.gate) {
            let namespace = params.get("namespace").and_then(Value::as_str);
            ctx.grant = Some(std::sync::Arc::new(app.authorize(caller, capability, namespace)?));
        }
        (method.handler)(ctx, params).await
    }

    /// The OpenRPC 1.2 document of this endpoint, from the tables.
    pub fn openrpc(&self) -> Value {
        let methods: Vec<Value> = self
            .namespaces
            .iter()
            .flat_map(|ns| ns.methods.iter().map(move |m| describe(ns, m)))
            .collect();
        json!({
            "openrpc": "1.2.6",
            "info": { "title": self.title, "version": env!("CARGO_PKG_VERSION"), "description": self.description },
            "methods": methods,
            "components": {
                "errors": self
                    .errors
                    .iter()
                    .flat_map(|codes| codes.iter())
                    .map(|(code, message)| (code.to_string(), json!({ "code": code, "message": message })))
                    .collect::<Map<String, Value>>(),
            },
        })
    }
}

/// A method in the OpenRPC document. `x-auth` says which credentials it needs; a subscription
/// has `x-notification`, the method name of the notifications it sends.
fn describe(namespace: &Namespace, m: &Method) -> Value {
    let schema = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    let params: Vec<Value> = m
        .params
        .iter()
        .map(|p| json!({ "name": p.name, "summary": p.summary, "required": p.required, "schema": schema(p.schema) }))
        .collect();
    let mut doc = json!({
        "name": m.name,
        "summary": m.summary,
        "tags": [{ "name": namespace.name, "description": namespace.summary }],
        "paramStructure": "either",
        "params": params,
        "result": { "name": "result", "schema": schema(m.result) },
        "x-auth": m.auth.describe(),
    });
    match m.kind {
        Kind::Call => {}
        Kind::Subscribe { notification } => {
            doc["x-notification"] = json!(notification);
            doc["description"] = json!(format!(
                "WebSocket only. Sends {{\"jsonrpc\":\"2.0\",\"method\":\"{notification}\",\"params\":{{\"subscription\":<id>,\"result\":<item>}}}}; \
                 a subscription that ends on its own sends a last one with \"error\" instead of \"result\"."
            ));
        }
        Kind::Unsubscribe => doc["description"] = json!("WebSocket only."),
    }
    doc
}

pub fn to_value(value: impl serde::Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::new(code::INTERNAL_ERROR, e.to_string()))
}

/// Turns positional params into named ones and checks required and unknown names.
fn named_params(method: &Method, params: Value) -> Result<Params, RpcError> {
    let named = match params {
        Value::Null => Map::new(),
        Value::Object(map) => map,
        Value::Array(values) => {
            if values.len() > method.params.len() {
                return Err(RpcError::invalid_params(format!(
                    "{} takes at most {} params, got {}",
                    method.name,
                    method.params.len(),
                    values.len()
                )));
            }
            method.params.iter().map(|p| p.name.to_string()).zip(values).collect()
        }
        _ => return Err(RpcError::invalid_params("params must be an object or an array")),
    };
    for key in named.keys() {
        if !method.params.iter().any(|p| p.name == key) {
            return Err(RpcError::invalid_params(format!("{} has no param named '{key}'", method.name)));
        }
    }
    for param in method.params.iter().filter(|p| p.required) {
        if !named.contains_key(param.name) {
            return Err(RpcError::invalid_params(format!("missing param '{}'", param.name)));
        }
    }
    Ok(named)
}

/// A string param.
pub fn string<'a>(params: &'a Params, name: &str) -> Result<&'a str, RpcError> {
    params.get(name).and_then(Value::as_str).ok_or_else(|| RpcError::invalid_params(format!("param '{name}' must be a string")))
}

/// Reads a param given as a string and parses it (multiaddr, CID, address...).
pub fn parse_param<T>(params: &Params, name: &str) -> Result<T, RpcError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = string(params, name)?;
    text.parse().map_err(|e| RpcError::invalid_params(format!("invalid {name} '{text}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_in_the_tables_is_valid_json() {
        for m in ADMIN.methods().chain(APP.methods()) {
            assert!(serde_json::from_str::<Value>(m.result).is_ok(), "{}", m.name);
            for p in m.params {
                assert!(serde_json::from_str::<Value>(p.schema).is_ok(), "{}.{}", m.name, p.name);
            }
        }
    }

    #[test]
    fn names_are_unique_and_each_table_holds_its_own_prefixes() {
        let prefixes = |namespace: &str| -> &[&str] {
            match namespace {
                "node" => &["rpc.", "node_", "swarm_", "dht_"],
                "content" => &["content_", "pin_", "repo_", "dag_"],
                "core" => &["core_"],
                "msg" => &["msg_"],
                "kb" => &["rpc.", "kb_"],
                other => panic!("a namespace this test does not know: {other}"),
            }
        };
        for registry in [&ADMIN, &APP] {
            let mut seen = std::collections::HashSet::new();
            for ns in registry.namespaces {
                for m in ns.methods {
                    assert!(seen.insert(m.name), "{} is in the tables twice", m.name);
                    assert!(prefixes(ns.name).iter().any(|p| m.name.starts_with(p)), "{} is in the {} table", m.name, ns.name);
                }
            }
        }
        // The endpoints share no method but rpc.discover: an admin method is never an app one.
        for m in APP.methods().filter(|m| m.name != "rpc.discover") {
            assert!(ADMIN.find(m.name).is_none(), "{} is on both endpoints", m.name);
            assert_ne!(m.auth, Auth::Admin, "{} needs the admin secret on the app endpoint", m.name);
        }
    }

    #[test]
    fn rpc_discover_lists_exactly_the_rows_of_the_tables() {
        for registry in [&ADMIN, &APP] {
            check_discover(registry);
        }
        let codes = APP.openrpc()["components"]["errors"].as_object().map(|e| e.len()).unwrap_or(0);
        assert_eq!(codes, code::ALL.len() + super::super::app::code::ALL.len(), "the app endpoint documents its own codes too");
    }

    fn check_discover(registry: &'static Registry) {
        let doc = registry.openrpc();
        let listed: Vec<&str> = doc["methods"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
        let rows: Vec<&str> = registry.methods().map(|m| m.name).collect();
        assert_eq!(listed, rows);
        for m in doc["methods"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or_default();
            let row = registry.find(name).unwrap_or_else(|| panic!("{name} is listed but not found"));
            assert_eq!(m["x-auth"], row.auth.describe());
            assert_eq!(m["params"].as_array().map(Vec::len), Some(row.params.len()), "{name}");
            if let Kind::Subscribe { notification } = row.kind {
                assert_eq!(m["x-notification"], notification);
            }
        }
    }

    #[test]
    fn positional_params_are_named_and_unknown_ones_refused() {
        let method = ADMIN.find("swarm_connect").unwrap();
        let named = named_params(method, json!(["/ip4/127.0.0.1/tcp/1"])).unwrap();
        assert_eq!(named["addr"], "/ip4/127.0.0.1/tcp/1");
        assert_eq!(named_params(method, json!({"adr": "x"})).unwrap_err().code, code::INVALID_PARAMS);
        assert_eq!(named_params(method, json!({})).unwrap_err().code, code::INVALID_PARAMS);
        assert_eq!(named_params(method, json!(["a", "b"])).unwrap_err().code, code::INVALID_PARAMS);
        assert_eq!(named_params(method, json!("a")).unwrap_err().code, code::INVALID_PARAMS);
    }

    #[test]
    fn an_app_method_is_refused_to_the_admin_and_says_which_rights_it_needs() {
        assert!(Auth::Admin.permits(&Caller::Admin));
        for capability in [Capability::Read, Capability::Write] {
            assert!(!Auth::App(capability).permits(&Caller::Admin));
        }
        assert_eq!(Auth::App(Capability::Write).describe(), "app:write");
    }

    /// Every method the tables describe, called on a running node (in this process) with no
    /// params and with every declared param set to junk: each reaches its handler, which
    /// answers or refuses with a documented code; none is "method not found".
    #[tokio::test]
    async fn every_described_method_dispatches_to_its_handler() -> anyhow::Result<()> {
        use kubelt_protocol::node::{Config, Node};
        let dir = tempfile::tempdir()?;
        let store = kubelt_protocol::store::Store::open(dir.path().join("blocks"))?;
        let node = Node::start(libp2p::identity::Keypair::generate_ed25519(), store.clone(), Config::default()).await?;
        let hosts = super::super::AllowedHosts::new(([127, 0, 0, 1], 0).into(), &[]);
        let state = ApiState::new(node.client.clone(), store, "secret".into(), hosts, Default::default());
        let documented: Vec<i64> = code::ALL.iter().map(|(code, _)| *code).collect();
        let mut answered = 0;
        for method in ADMIN.methods() {
            let junk: Params = method.params.iter().map(|p| (p.name.to_string(), json!("junk"))).collect();
            for params in [Value::Null, Value::Object(junk)] {
                match ADMIN.dispatch(Ctx::admin(state.clone(), None), method.name, params.clone()).await {
                    Ok(_) => answered += 1,
                    Err(error) => {
                        assert_ne!(error.code, code::METHOD_NOT_FOUND, "{} is described but not dispatched", method.name);
                        assert!(documented.contains(&error.code), "{} with {params} answered an undocumented code: {error:?}", method.name);
                    }
                }
            }
        }
        assert!(answered >= 10, "only {answered} calls succeeded: the node did not answer");
        let unknown = ADMIN.dispatch(Ctx::admin(state.clone(), None), "no_such_method", Value::Null).await.unwrap_err();
        assert_eq!(unknown.code, code::METHOD_NOT_FOUND);
        assert!(unknown.message.contains("no_such_method"));
        node.stop().await;
        Ok(())
    }
}
