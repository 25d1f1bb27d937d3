//! `kb_putObject`/`kb_getObject`: an app's files as IPFS content, recorded in the core.
//!
//! The bytes are imported as a UnixFS file (CID v1, raw leaves — the CID Kubo gives with
//! `--cid-version 1`) into this node's store and pinned; the core records, at the object's
//! namespace/path, the current version and every earlier one:
//! `{"kind":"object","version":n,"cid","size","contentType","visibility","versions":[…]}`,
//! where `versions` lists every version, oldest first, so earlier ones stay readable (their
//! blocks stay pinned). The record is an ordinary value of the core, so it replicates and
//! other replicas fetch the bytes over bitswap by CID.
//!
//! `visibility: "private"` encrypts the bytes under the core's current data key before they
//! become blocks (the `kbobj1` format of `kubelt_protocol::core::private::object`), so the CID
//! is the ciphertext's and every replica, bitswap peer and gateway sees only ciphertext; the
//! record names the key (`keyId`), and the node does not announce the CID in the DHT.
//! `kb_getObject` decrypts on a node that holds that key (a device of the owner, or a node the
//! owner unlocked) and answers -32016 (encrypted) elsewhere, -32017 for a tampered object. The
//! record itself (CID, size, type, key id) is a value of the namespace: plain unless the
//! namespace is private too.

use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};

use kubelt_protocol::store::PinKind;
use kubelt_protocol::unixfs::{self, ImportOptions};

use super::registry::{string, Ctx, Params};
use super::{code, RpcError};

/// Largest object read back inline (objects are written in requests of at most 2 MiB).
const MAX_OBJECT: u64 = 16 << 20;

pub async fn put(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let core = ctx.grant()?.core;
    let (namespace, path) = (string(&p, "namespace")?.to_string(), string(&p, "path")?.to_string());
    let data = base64::engine::general_purpose::STANDARD
        .decode(string(&p, "data")?)
        .map_err(|e| RpcError::invalid_params(format!("param 'data' is not base64: {e}")))?;
    let options = p.get("options").cloned().unwrap_or(Value::Null);
    let content_type = options.get("contentType").and_then(Value::as_str).unwrap_or("application/octet-stream").to_string();
    let visibility = match options.get("visibility").and_then(Value::as_str) {
        None | Some("public") => "public",
        Some("private") => "private",
        Some(other) => return Err(RpcError::invalid_params(format!("options.visibility must be \"public\" or \"private\", not {other:?}"))),
    };
    if content_type.len() > 255 {
        return Err(RpcError::invalid_params("options.contentType is longer than 255 characters"));
    }
    let cores = ctx.state.client.cores();
    let previous = cores.get(core, namespace.clone(), path.clone()).await.map_err(RpcError::core)?;
    let mut versions: Vec<Value> = match &previous {
        Value::Null => vec![],
        record if record["kind"] == "object" => record["versions"].as_array().cloned().unwrap_or_default(),
        _ => return Err(RpcError::invalid_params(format!("{namespace}/{path} holds a value that is not an object record; pick another path"))),
    };
    let size = data.len() as u64;
    // A hosted node's quota: the core's document plus its objects, with this one.
    if let Some(limit) = super::app::core_byte_limit(&ctx.state.gate, &ctx.state.store, &core)? {
        let used = cores.summary(core).await.map_err(RpcError::core)?.bytes + size;
        if used > limit {
            return Err(super::app::core_full(&core, used, limit));
        }
    }
    let key = match visibility {
        "private" => Some(cores.object_key(core).await.map_err(RpcError::core)?),
        _ => None,
    };
    let key_id = key.as_ref().map(|k| hex::encode(k.id));
    let root = {
        let _guard = ctx.state.gc_lock.read().await;
        let store = ctx.state.store.clone();
        super::content::blocking(move || {
            let imported = match key {
                Some(key) => super::private::add_encrypted(&store, &data[..], &key, &ImportOptions::cid_v1())?,
                None => unixfs::add_file(&store, &data[..], &ImportOptions::cid_v1(), &mut |_| {})?,
            };
            store.pin(&imported.cid, PinKind::Recursive)?;
            Ok(imported.cid)
        })
        .await?
    };
    if let super::Gate::App(app) = &ctx.state.gate {
        app.limits.add_object_bytes(&ctx.state.store, &core, size)?;
    }
    let _ = ctx.state.client.content().blocks_added(vec![root]).await;
    if visibility == "public" {
        let _ = ctx.state.client.content().provide(root).await;
    }
    let version = versions.len() as u64 + 1;
    let mut entry = json!({ "version": version, "cid": root.to_string(), "size": size, "contentType": content_type, "visibility": visibility });
    if let Some(id) = key_id {
        entry["keyId"] = json!(id);
    }
    versions.push(entry.clone());
    let mut record = entry;
    record["kind"] = json!("object");
    record["versions"] = Value::Array(versions);
    cores.set(core, namespace, path, record).await.map_err(RpcError::core)?;
    Ok(json!({ "version": version, "size": size, "cid": root.to_string() }))
}

pub async fn get(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let core = ctx.grant()?.core;
    let (namespace, path) = (string(&p, "namespace")?.to_string(), string(&p, "path")?.to_string());
    let record = ctx.state.client.cores().get(core, namespace.clone(), path.clone()).await.map_err(RpcError::core)?;
    if record["kind"] != "object" {
        return Err(RpcError::new(code::INVALID_PARAMS, format!("no object at {namespace}/{path}")));
    }
    let wanted = p.get("options").and_then(|o| o.get("version")).and_then(Value::as_u64);
    let entry = match wanted {
        None => record.clone(),
        Some(v) => record["versions"]
            .as_array()
            .and_then(|all| all.iter().find(|e| e["version"].as_u64() == Some(v)).cloned())
            .ok_or_else(|| RpcError::invalid_params(format!("{namespace}/{path} has no version {v}")))?,
    };
    let cid_text = entry["cid"].as_str().unwrap_or_default();
    let cid = crate::content::parse_cid(cid_text).map_err(|e| RpcError::node(format!("the record's CID is invalid: {e}")))?;
    if entry.get("keyId").is_some() {
        // Ciphertext is at most 34 + 16 per 64 KiB bytes longer; the limit is the plaintext's.
        let data = super::private::read_all(&ctx.state, core, cid, MAX_OBJECT).await?;
        return Ok(json!({
            "data": base64::engine::general_purpose::STANDARD.encode(&data),
            "version": entry["version"],
            "cid": cid_text,
            "contentType": entry["contentType"],
        }));
    }
    let source = super::content::network(&ctx.state).await?;
    let mut data = Vec::new();
    let mut stream = Box::pin(unixfs::cat(source, cid));
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.map_err(RpcError::node)?);
        if data.len() as u64 > MAX_OBJECT {
            return Err(RpcError::node(format!("the object is larger than {MAX_OBJECT} bytes")));
        }
    }
    Ok(json!({
        "data": base64::engine::general_purpose::STANDARD.encode(&data),
        "version": entry["version"],
        "cid": cid_text,
        "contentType": entry["contentType"],
    }))
}
