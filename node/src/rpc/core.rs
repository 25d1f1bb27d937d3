//! The core methods: follow, submit owner statements, set/get values, list cores, and the
//! texts an owner signs.

use serde_json::{json, Map, Value};

use kubelt_protocol::core::{delegation_message, owner_statement, Address};

use super::methods::to_value;
use super::{ApiState, RpcError};

fn string<'a>(params: &'a Map<String, Value>, name: &str) -> Result<&'a str, RpcError> {
    params.get(name).and_then(Value::as_str).ok_or_else(|| RpcError::invalid_params(format!("param '{name}' must be a string")))
}

fn address(params: &Map<String, Value>) -> Result<Address, RpcError> {
    let text = string(params, "address")?;
    Address::parse(text).map_err(|e| RpcError::invalid_params(format!("invalid address '{text}': {e}")))
}

fn peer(params: &Map<String, Value>) -> Result<Option<libp2p::PeerId>, RpcError> {
    match params.get("peer") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => text.parse().map(Some).map_err(|e| RpcError::invalid_params(format!("invalid peer id '{text}': {e}"))),
        Some(_) => Err(RpcError::invalid_params("param 'peer' must be a string")),
    }
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

pub async fn dispatch(state: &ApiState, method: &str, p: Map<String, Value>) -> Result<Value, RpcError> {
    let client = &state.client;
    match method {
        "core_follow" => to_value(client.cores().follow(address(&p)?).await.map_err(RpcError::core)?),
        "core_submit" => {
            let message = string(&p, "message")?;
            let signature = string(&p, "signature")?;
            let statement = owner_statement(message, signature).map_err(|e| RpcError::invalid_params(e.to_string()))?;
            to_value(client.cores().submit(statement).await.map_err(RpcError::core)?)
        }
        "core_set" => {
            let core = address(&p)?;
            let value = p.get("value").cloned().ok_or_else(|| RpcError::invalid_params("missing param 'value'"))?;
            let summary = client
                .cores().set(core, string(&p, "namespace")?.to_string(), string(&p, "path")?.to_string(), value)
                .await
                .map_err(RpcError::core)?;
            to_value(summary)
        }
        "core_get" => {
            let core = address(&p)?;
            let path = p.get("path").and_then(Value::as_str).unwrap_or("").to_string();
            client.cores().get(core, string(&p, "namespace")?.to_string(), path).await.map_err(RpcError::core)
        }
        "core_ls" => to_value(client.cores().list().await.map_err(RpcError::node)?),
        "core_heads" => {
            let core = address(&p)?;
            let cores = client.cores().list().await.map_err(RpcError::node)?;
            let summary = cores
                .into_iter()
                .find(|c| c.address == core.to_checksum())
                .ok_or_else(|| RpcError::core(kubelt_protocol::node::CoreCommandError::NotHeld(core.to_checksum())))?;
            Ok(json!(summary.heads))
        }
        "core_delegationMessage" => {
            let core = address(&p)?;
            let peer = match peer(&p)? {
                Some(peer) => peer,
                None => client.info().await.map_err(RpcError::node)?.peer_id.parse().map_err(RpcError::node)?,
            };
            let namespaces_text = p.get("namespaces").and_then(Value::as_str).unwrap_or("*");
            let namespaces: Vec<&str> = namespaces_text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            let expires = parse_duration(p.get("expires").and_then(Value::as_str).unwrap_or("30d")).map_err(RpcError::invalid_params)?;
            let now = time::OffsetDateTime::now_utc();
            delegation_expiry(now, expires).map_err(RpcError::invalid_params)?;
            let message = delegation_message(&core, &peer, &namespaces, expires, now)
                .map_err(|e| RpcError::invalid_params(e.to_string()))?;
            Ok(json!({ "message": message }))
        }
        "core_revocationMessage" => {
            let core = address(&p)?;
            let peer = peer(&p)?.ok_or_else(|| RpcError::invalid_params("missing param 'peer'"))?;
            let message = client.cores().revocation_message(core, peer).await.map_err(RpcError::core)?;
            Ok(json!({ "message": message }))
        }
        other => Err(RpcError::new(super::code::METHOD_NOT_FOUND, format!("method not found: {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
