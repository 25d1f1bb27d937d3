//! The content methods: add, cat, get, stat, ls, pins, GC, CAR import/export.

use std::path::PathBuf;

use base64::Engine;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use kubelt_protocol::node::NetworkBlocks;
use kubelt_protocol::unixfs;

use super::{ApiState, RpcError};
use crate::content::{self, AddRequest};

/// Largest file `content_cat` returns inline.
const MAX_INLINE_CAT: u64 = 16 << 20;

fn params<T: DeserializeOwned>(params: Map<String, Value>) -> Result<T, RpcError> {
    serde_json::from_value(Value::Object(params)).map_err(|e| RpcError::invalid_params(e.to_string()))
}

fn cid_param(params: &Map<String, Value>) -> Result<cid::Cid, RpcError> {
    let text = params.get("cid").and_then(Value::as_str).ok_or_else(|| RpcError::invalid_params("param 'cid' must be a string"))?;
    content::parse_cid(text).map_err(|e| RpcError::invalid_params(e.to_string()))
}

fn path_param(params: &Map<String, Value>) -> Result<String, RpcError> {
    let path = params.get("path").and_then(Value::as_str).ok_or_else(|| RpcError::invalid_params("param 'path' must be a string"))?;
    // Fail fast, with invalid-params, on a path whose CID does not parse.
    let first = path.trim_start_matches("/ipfs/").split('/').next().unwrap_or("");
    content::parse_cid(first).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    Ok(path.to_string())
}

/// A path param that must be absolute: the node may run in another directory than the caller.
fn absolute_param(params: &Map<String, Value>, name: &str) -> Result<PathBuf, RpcError> {
    let path = PathBuf::from(params.get(name).and_then(Value::as_str).unwrap_or_default());
    if !path.is_absolute() {
        return Err(RpcError::invalid_params(format!("{name} must be an absolute path")));
    }
    Ok(path)
}

/// The `path` param resolved to a CID, with the network source that fetched along the way.
async fn resolved(state: &ApiState, params: &Map<String, Value>) -> Result<(String, NetworkBlocks, cid::Cid), RpcError> {
    let path = path_param(params)?;
    let source = network(state).await?;
    let cid = unixfs::resolve(&source, &path).await.map_err(RpcError::node)?;
    Ok((path, source, cid))
}

async fn network(state: &ApiState) -> Result<NetworkBlocks, RpcError> {
    NetworkBlocks::new(state.store.clone(), state.client.clone()).await.map_err(RpcError::node)
}

/// Runs a blocking store operation off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f).await.map_err(RpcError::node)?.map_err(|e| RpcError::node(format!("{e:#}")))
}

pub async fn dispatch(state: &ApiState, method: &str, p: Map<String, Value>) -> Result<Value, RpcError> {
    match method {
        "content_add" => {
            let request: AddRequest = params(p)?;
            if !request.path.is_absolute() {
                return Err(RpcError::invalid_params("path must be absolute (the node may run in another directory)"));
            }
            request.import_options().map_err(|e| RpcError::invalid_params(e.to_string()))?;
            let _guard = state.gc_lock.read().await;
            let store = state.store.clone();
            let added = blocking(move || content::add(&store, &request, &mut |_| {})).await?;
            if let Ok(root) = content::parse_cid(&added.cid) {
                let _ = state.client.content().blocks_added(vec![root]).await;
                let _ = state.client.content().provide(root).await;
            }
            Ok(serde_json::to_value(added).unwrap_or(Value::Null))
        }
        "content_cat" => {
            let (path, source, cid) = resolved(state, &p).await?;
            let stat = unixfs::stat(&source, cid).await.map_err(RpcError::node)?;
            if stat.size > MAX_INLINE_CAT {
                return Err(RpcError::node(format!(
                    "{path} is {} bytes, more than content_cat returns inline ({MAX_INLINE_CAT}); stream it from the gateway, GET /ipfs/{path} (its URL is in <repo>/gateway)",
                    stat.size
                )));
            }
            let mut data = Vec::with_capacity(stat.size as usize);
            let mut stream = Box::pin(unixfs::cat(source, cid));
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk.map_err(RpcError::node)?);
            }
            Ok(json!({ "size": data.len(), "data_base64": base64::engine::general_purpose::STANDARD.encode(&data) }))
        }
        "content_get" => {
            let output = absolute_param(&p, "output")?;
            let (_, source, cid) = resolved(state, &p).await?;
            let report = unixfs::get(&source, cid, &output).await.map_err(RpcError::node)?;
            Ok(json!({ "cid": cid.to_string(), "files": report.files, "directories": report.directories, "symlinks": report.symlinks, "bytes": report.bytes }))
        }
        "content_stat" => {
            let (_, source, cid) = resolved(state, &p).await?;
            let stat = unixfs::stat(&source, cid).await.map_err(RpcError::node)?;
            Ok(json!({ "cid": cid.to_string(), "type": stat.kind.name(), "size": stat.size, "cumulative_size": stat.cumulative_size, "links": stat.blocks }))
        }
        "content_ls" => {
            let (_, source, cid) = resolved(state, &p).await?;
            let entries = unixfs::ls(&source, cid).await.map_err(RpcError::node)?;
            Ok(Value::Array(entries.into_iter().map(|e| json!({ "name": e.name, "cid": e.cid.to_string(), "size": e.tsize })).collect()))
        }
        "pin_add" => {
            let cid = cid_param(&p)?;
            let recursive = match p.get("recursive") {
                None => true,
                Some(Value::Bool(recursive)) => *recursive,
                Some(_) => return Err(RpcError::invalid_params("param 'recursive' must be a boolean")),
            };
            let _guard = state.gc_lock.read().await;
            let source = network(state).await?;
            let entry = content::pin_add(&state.store, &source, cid, recursive).await.map_err(|e| RpcError::node(format!("{e:#}")))?;
            Ok(serde_json::to_value(entry).unwrap_or(Value::Null))
        }
        "pin_rm" => {
            let cid = cid_param(&p)?;
            let store = state.store.clone();
            blocking(move || content::pin_rm(&store, cid)).await?;
            Ok(json!({ "cid": cid.to_string() }))
        }
        "pin_ls" => {
            let store = state.store.clone();
            Ok(serde_json::to_value(blocking(move || content::pin_ls(&store)).await?).unwrap_or(Value::Null))
        }
        "repo_gc" => {
            let _guard = state.gc_lock.write().await;
            let store = state.store.clone();
            Ok(serde_json::to_value(blocking(move || content::gc(&store)).await?).unwrap_or(Value::Null))
        }
        "dag_export" => {
            let cid = cid_param(&p)?;
            let output = absolute_param(&p, "output")?;
            let source = network(state).await?;
            let file = tokio::fs::File::create(&output).await.map_err(|e| RpcError::node(format!("cannot create {}: {e}", output.display())))?;
            let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
            let summary = kubelt_protocol::car::export_car_async(&source, cid, &mut writer).await.map_err(RpcError::node)?;
            tokio::io::AsyncWriteExt::flush(&mut writer).await.map_err(RpcError::node)?;
            Ok(json!({ "root": cid.to_string(), "blocks": summary.blocks, "bytes": summary.bytes }))
        }
        "dag_import" => {
            let path = absolute_param(&p, "path")?;
            let _guard = state.gc_lock.read().await;
            let store = state.store.clone();
            let imported = blocking(move || content::dag_import(&store, &path)).await?;
            Ok(serde_json::to_value(imported).unwrap_or(Value::Null))
        }
        other => Err(RpcError::new(super::code::METHOD_NOT_FOUND, format!("method not found: {other}"))),
    }
}
