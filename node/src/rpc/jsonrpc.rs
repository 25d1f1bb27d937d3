//! JSON-RPC 2.0 on the wire: parsing a request body (one call or a batch) and running it
//! through a [`Registry`], the same for HTTP bodies and WebSocket messages.
//!
//! Written here rather than taken from a framework because the rules of §4 and §6 decide what a
//! client sees for every malformed request: an `id` that is not a string, a number or null is
//! an invalid request (never a notification that silently runs), a batch of notifications gets
//! no reply, and a batch is capped. The property tests below hold the parser to those rules.

use serde_json::{json, Value};

use super::registry::Ctx;
use super::{code, RpcError};

/// A JSON-RPC error reply.
pub fn error_response(id: Value, error: RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "error": error.to_json(), "id": id })
}

/// Runs a request body (one call or a batch) and returns its reply; `None` when nothing is to
/// be answered (notifications only). A batch's calls run one after another.
pub async fn run_body(ctx: &Ctx, body: &[u8]) -> Option<Value> {
    if let Err(error) = super::app::check_request_size(&ctx.state.gate, body.len()) {
        return Some(error_response(Value::Null, error));
    }
    match parse_body(body) {
        Err(reply) => Some(reply),
        Ok(Body::Single(call)) => run_call(ctx, call).await,
        Ok(Body::Batch(calls)) => {
            let mut replies = Vec::new();
            for call in calls {
                if let Some(reply) = run_call(ctx, call).await {
                    replies.push(reply);
                }
            }
            batch_reply(replies)
        }
    }
}

/// The reply to a batch: its calls' replies, or nothing when every call was a notification
/// (JSON-RPC 2.0 §6: never an empty array).
fn batch_reply(replies: Vec<Value>) -> Option<Value> {
    (!replies.is_empty()).then_some(Value::Array(replies))
}

/// Most calls in one batch. A batch's calls run one after another and each gets a reply: with
/// no cap, a body at the 2 MiB request limit could queue ~100k tiny calls and build a reply ~100
/// times its size.
const MAX_BATCH: usize = 1000;

/// A request body, parsed: one call or a batch.
#[derive(Debug)]
enum Body {
    Single(Result<Call, Value>),
    Batch(Vec<Result<Call, Value>>),
}

/// One well-formed call; a malformed one is its error reply instead (a `Value`).
#[derive(Debug)]
struct Call {
    /// `None` for a notification, which gets no reply.
    id: Option<Value>,
    method: String,
    params: Value,
}

/// Parses a request body; `Err` is the single error reply to the whole body (a parse error
/// or an empty batch).
fn parse_body(body: &[u8]) -> Result<Body, Value> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| error_response(Value::Null, RpcError::new(code::PARSE_ERROR, format!("parse error: {e}"))))?;
    match request {
        Value::Array(calls) if calls.is_empty() => {
            Err(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "empty batch")))
        }
        Value::Array(calls) if calls.len() > MAX_BATCH => Err(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, format!("a batch holds at most {MAX_BATCH} calls, got {}", calls.len())),
        )),
        Value::Array(calls) => Ok(Body::Batch(calls.into_iter().map(parse_call).collect())),
        call => Ok(Body::Single(parse_call(call))),
    }
}

/// Checks one call of a request (JSON-RPC 2.0 §4); a malformed one becomes its error reply.
fn parse_call(call: Value) -> Result<Call, Value> {
    let Value::Object(mut call) = call else {
        return Err(error_response(Value::Null, RpcError::new(code::INVALID_REQUEST, "a request must be a JSON object")));
    };
    let id = call.remove("id");
    // §4: an id is a string, a number or null; anything else cannot be echoed back safely.
    if matches!(id, Some(Value::Object(_) | Value::Array(_) | Value::Bool(_))) {
        return Err(error_response(
            Value::Null,
            RpcError::new(code::INVALID_REQUEST, "\"id\" must be a string, a number or null"),
        ));
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if call.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"")));
    }
    let Some(Value::String(method)) = call.remove("method") else {
        return Err(error_response(reply_id, RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string")));
    };
    let params = call.remove("params").unwrap_or(Value::Null);
    Ok(Call { id, method, params })
}

/// Runs one call; `None` for a notification (no `id`), which gets no reply.
async fn run_call(ctx: &Ctx, call: Result<Call, Value>) -> Option<Value> {
    let Call { id, method, params } = match call {
        Ok(call) => call,
        Err(reply) => return Some(reply),
    };
    let result = ctx.registry.dispatch(ctx.clone(), &method, params).await;
    let reply_id = id?;
    Some(match result {
        Ok(value) => json!({ "jsonrpc": "2.0", "result": value, "id": reply_id }),
        Err(error) => {
            if error.code == code::INTERNAL_ERROR || error.code == code::NODE_ERROR {
                tracing::warn!(%method, "API call failed: {}", error.message);
            }
            error_response(reply_id, error)
        }
    })
}

#[cfg(test)]
mod tests {
    //! The request parsing, property-tested: arbitrary bodies never panic and always get a
    //! JSON-RPC answer, every rule of §4 decides valid from invalid, valid calls round-trip.
    //! `PROPTEST_CASES=N` sets the cases per property (default 4000).

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    fn runner() -> TestRunner {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
    }

    /// Any JSON value, nested a few levels.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Finite floats that serde_json reads back exactly (without its `float_roundtrip`
            // feature a few lose their last bit, which no method of this API cares about).
            any::<f64>()
                .prop_filter("JSON floats are finite and read back exactly", |f| {
                    f.is_finite() && serde_json::from_str::<f64>(&Value::from(*f).to_string()).ok() == Some(*f)
                })
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
            prop::sample::select(vec!["2.0", "1.0", "node_id", "id", "jsonrpc", "method", "params"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(vec!["jsonrpc", "method", "params", "id", "x"]), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    /// A call as a client would write it: `(id, method, params)`, `id: None` a notification.
    fn arb_call() -> impl Strategy<Value = (Option<Value>, String, Value)> {
        let id = prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<i64>().prop_map(|n| Some(Value::from(n))),
            ".{0,12}".prop_map(|s| Some(Value::from(s))),
        ];
        let params = prop_oneof![Just(Value::Null), prop::collection::vec(arb_json(), 0..3).prop_map(Value::Array), arb_json()];
        (id, ".{0,16}", params)
    }

    fn call_json((id, method, params): &(Option<Value>, String, Value)) -> Value {
        let mut call = json!({ "jsonrpc": "2.0", "method": method });
        if !params.is_null() {
            call["params"] = params.clone();
        }
        if let Some(id) = id {
            call["id"] = id.clone();
        }
        call
    }

    /// An error reply: JSON-RPC 2.0 shape, with the given code.
    fn is_error_reply(reply: &Value, codes: &[i64]) -> bool {
        reply["jsonrpc"] == "2.0"
            && reply.get("id").is_some()
            && reply["error"]["message"].is_string()
            && reply["error"]["code"].as_i64().is_some_and(|c| codes.contains(&c))
    }

    /// What §4 says about one call: whether it is valid.
    fn valid_call(call: &Value) -> bool {
        let Value::Object(map) = call else { return false };
        map.get("jsonrpc") == Some(&json!("2.0"))
            && map.get("method").is_some_and(Value::is_string)
            && !matches!(map.get("id"), Some(Value::Object(_) | Value::Array(_) | Value::Bool(_)))
    }

    fn check_call(call: &Value, parsed: &Result<Call, Value>) -> Result<(), TestCaseError> {
        match parsed {
            Ok(parsed) => {
                prop_assert!(valid_call(call), "{call} accepted");
                prop_assert_eq!(&parsed.id, &call.get("id").cloned());
                prop_assert_eq!(Some(&Value::from(parsed.method.clone())), call.get("method"));
                prop_assert_eq!(&parsed.params, call.get("params").unwrap_or(&Value::Null));
            }
            Err(reply) => {
                prop_assert!(!valid_call(call), "{call} refused: {reply}");
                prop_assert!(is_error_reply(reply, &[code::INVALID_REQUEST]), "{reply}");
            }
        }
        Ok(())
    }

    #[test]
    fn arbitrary_bodies_never_panic_and_get_a_parse_or_request_error() {
        let strategy = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            arb_json().prop_map(|v| v.to_string().into_bytes()),
            // A valid call with one member replaced by any value, or removed.
            (arb_call(), prop::sample::select(vec!["jsonrpc", "method", "params", "id"]), prop::option::of(arb_json())).prop_map(
                |(c, member, value)| {
                    let mut call = call_json(&c);
                    if let Some(map) = call.as_object_mut() {
                        match value {
                            Some(value) => map.insert(member.to_string(), value),
                            None => map.remove(member),
                        };
                    }
                    call.to_string().into_bytes()
                }
            ),
            (arb_call(), any::<usize>(), any::<u8>()).prop_map(|(c, at, bit)| {
                // A valid call with one bit flipped.
                let mut bytes = call_json(&c).to_string().into_bytes();
                let at = at % bytes.len();
                bytes[at] ^= 1 << (bit % 8);
                bytes
            }),
        ];
        runner()
            .run(&strategy, |body| {
                match parse_body(&body) {
                    Err(reply) => prop_assert!(is_error_reply(&reply, &[code::PARSE_ERROR, code::INVALID_REQUEST]), "{reply}"),
                    Ok(Body::Single(call)) => {
                        let value: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        check_call(&value, &call)?;
                    }
                    Ok(Body::Batch(calls)) => {
                        let value: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let items = value.as_array().ok_or_else(|| TestCaseError::fail("a batch from a non-array"))?;
                        prop_assert!(!items.is_empty() && items.len() <= MAX_BATCH);
                        prop_assert_eq!(items.len(), calls.len());
                        for (item, call) in items.iter().zip(&calls) {
                            check_call(item, call)?;
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn valid_calls_and_batches_round_trip_and_truncations_are_parse_errors() {
        let strategy = (prop::collection::vec(arb_call(), 1..5), any::<bool>(), any::<usize>());
        runner()
            .run(&strategy, |(calls, batch, cut)| {
                let body = if batch {
                    Value::Array(calls.iter().map(call_json).collect())
                } else {
                    call_json(&calls[0])
                };
                let text = body.to_string();
                let parsed = parse_body(text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let parsed = match parsed {
                    Body::Single(call) => vec![call],
                    Body::Batch(calls) => calls,
                };
                prop_assert_eq!(parsed.len(), if batch { calls.len() } else { 1 });
                for ((id, method, params), got) in calls.iter().zip(parsed) {
                    let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&got.id, id);
                    prop_assert_eq!(&got.method, method);
                    prop_assert_eq!(&got.params, params);
                }
                // A request cut short is never another request.
                let cut = cut % text.len();
                let reply = parse_body(&text.as_bytes()[..cut]).err().ok_or_else(|| TestCaseError::fail("cut body parsed"))?;
                prop_assert!(is_error_reply(&reply, &[code::PARSE_ERROR]), "{reply}");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn id_that_is_not_a_string_number_or_null_is_an_invalid_request() {
        for id in [json!({"a": 1}), json!([1]), json!(true)] {
            let body = json!({"jsonrpc": "2.0", "method": "node_id", "id": id}).to_string();
            let Ok(Body::Single(Err(reply))) = parse_body(body.as_bytes()) else { panic!("{body} accepted") };
            assert_eq!(reply["error"]["code"], code::INVALID_REQUEST);
            assert_eq!(reply["id"], Value::Null);
        }
    }

    #[test]
    fn batch_of_notifications_gets_no_reply() {
        // It used to get `[]`, which §6 forbids.
        assert_eq!(batch_reply(vec![]), None);
        assert_eq!(batch_reply(vec![json!(1)]), Some(json!([1])));
    }

    #[test]
    fn oversized_batch_is_refused_as_a_whole() {
        let call = json!({"jsonrpc": "2.0", "method": "node_id", "id": 1});
        let body = Value::Array(vec![call; MAX_BATCH + 1]).to_string();
        let reply = parse_body(body.as_bytes()).unwrap_err();
        assert_eq!(reply["error"]["code"], code::INVALID_REQUEST);
        assert!(matches!(parse_body(b"[]"), Err(reply) if reply["error"]["code"] == code::INVALID_REQUEST));
    }
}

