//! The content methods: add, cat, get, stat, ls, pins, GC, CAR import/export.

use std::path::PathBuf;

use base64::Engine;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use kubelt_protocol::node::NetworkBlocks;
use kubelt_protocol::unixfs;

use super::registry::{string, Auth, Ctx, Kind, Method, Namespace, Param, Params};
use super::{ApiState, RpcError};
use crate::content::{self, AddRequest};

/// Largest file `content_cat` returns inline.
const MAX_INLINE_CAT: u64 = 16 << 20;

fn params<T: DeserializeOwned>(params: Params) -> Result<T, RpcError> {
    serde_json::from_value(Value::Object(params)).map_err(|e| RpcError::invalid_params(e.to_string()))
}

fn cid_param(params: &Params) -> Result<cid::Cid, RpcError> {
    let text = string(params, "cid")?;
    content::parse_cid(text).map_err(|e| RpcError::invalid_params(e.to_string()))
}

fn path_param(params: &Params) -> Result<String, RpcError> {
    let path = string(params, "path")?;
    // Fail fast, with invalid-params, on a path whose CID does not parse.
    let first = path.trim_start_matches("/ipfs/").split('/').next().unwrap_or("");
    content::parse_cid(first).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    Ok(path.to_string())
}

/// A path param that must be absolute: the node may run in another directory than the caller.
fn absolute_param(params: &Params, name: &str) -> Result<PathBuf, RpcError> {
    let path = PathBuf::from(params.get(name).and_then(Value::as_str).unwrap_or_default());
    if !path.is_absolute() {
        return Err(RpcError::invalid_params(format!("{name} must be an absolute path")));
    }
    Ok(path)
}

/// The `path` param resolved to a CID, with the network source that fetched along the way.
async fn resolved(state: &ApiState, params: &Params) -> Result<(String, NetworkBlocks, cid::Cid), RpcError> {
    let path = path_param(params)?;
    let source = network(state).await?;
    let cid = unixfs::resolve(&source, &path).await.map_err(RpcError::node)?;
    Ok((path, source, cid))
}

pub(super) async fn network(state: &ApiState) -> Result<NetworkBlocks, RpcError> {
    NetworkBlocks::new(state.store.clone(), state.client.clone()).await.map_err(RpcError::node)
}

/// Runs a blocking store operation off the async threads.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f).await.map_err(RpcError::node)?.map_err(|e| RpcError::node(format!("{e:#}")))
}


const STRING: &str = r#"{"type":"string"}"#;
const BOOL: &str = r#"{"type":"boolean"}"#;
const INT: &str = r#"{"type":"integer"}"#;

pub static NAMESPACE: Namespace = Namespace {
    name: "content",
    summary: "IPFS content: add, read, pin, garbage-collect, CAR import and export.",
    methods: &[
        Method {
            name: "content_add",
            summary: "Imports a file or directory from the node's file system (like `ipfs add`) and pins it. CIDs equal Kubo's.",
            params: &[
                Param { name: "path", schema: STRING, required: true, summary: "absolute path on the node's machine" },
                Param { name: "recursive", schema: BOOL, required: false, summary: "add a directory tree" },
                Param { name: "cid_version", schema: INT, required: false, summary: "0 (default, Qm...) or 1 (bafy..., raw leaves)" },
                Param { name: "hidden", schema: BOOL, required: false, summary: "include files whose name starts with '.'" },
                Param { name: "pin", schema: BOOL, required: false, summary: "pin the root (default true)" },
                Param { name: "core", schema: STRING, required: false, summary: "a private object: encrypt the file under this core's data key first (the CID is the ciphertext's; this node must write the core)" },
            ],
            result: r#"{"type":"object","properties":{"cid":{"type":"string"},"size":{"type":"integer"},"name":{"type":"string"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(add(ctx, p)),
        },
        Method {
            name: "content_cat",
            summary: "A file's bytes, base64-encoded (at most 16 MiB; stream bigger files from the gateway, GET /ipfs/<cid>).",
            params: &[
                Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" },
                Param { name: "core", schema: STRING, required: false, summary: "a private object of this core: decrypt it (-32016 without the key)" },
            ],
            result: r#"{"type":"object","properties":{"data_base64":{"type":"string"},"size":{"type":"integer"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(cat(ctx, p)),
        },
        Method {
            name: "content_get",
            summary: "Writes a file or directory tree to the node's file system, fetching missing blocks.",
            params: &[
                Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" },
                Param { name: "output", schema: STRING, required: true, summary: "where to write it" },
                Param { name: "core", schema: STRING, required: false, summary: "a private object of this core: write it decrypted (-32016 without the key)" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(get(ctx, p)),
        },
        Method {
            name: "content_stat",
            summary: "Type, size and cumulative DAG size of a CID or path.",
            params: &[Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" }],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(stat(ctx, p)),
        },
        Method {
            name: "content_ls",
            summary: "Entries of a directory.",
            params: &[Param { name: "path", schema: STRING, required: true, summary: "CID or CID/path" }],
            result: r#"{"type":"array","items":{"type":"object"}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(ls(ctx, p)),
        },
        Method {
            name: "pin_add",
            summary: "Pins a CID: recursive (default) fetches and keeps the whole DAG, direct the one block.",
            params: &[
                Param { name: "cid", schema: STRING, required: true, summary: "the CID" },
                Param { name: "recursive", schema: BOOL, required: false, summary: "default true" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(pin_add(ctx, p)),
        },
        Method {
            name: "pin_rm",
            summary: "Removes a pin.",
            params: &[Param { name: "cid", schema: STRING, required: true, summary: "the CID" }],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(pin_rm(ctx, p)),
        },
        Method {
            name: "pin_ls",
            summary: "Every pin with its type.",
            params: &[],
            result: r#"{"type":"array"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| {
                Box::pin(async move {
                    let store = ctx.state.store.clone();
                    to_json(blocking(move || content::pin_ls(&store)).await?)
                })
            },
        },
        Method {
            name: "repo_gc",
            summary: "Deletes every block that no pin reaches.",
            params: &[],
            result: r#"{"type":"object","properties":{"removed":{"type":"integer"},"kept":{"type":"integer"}}}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, _| {
                Box::pin(async move {
                    let _guard = ctx.state.gc_lock.write().await;
                    let store = ctx.state.store.clone();
                    to_json(blocking(move || content::gc(&store)).await?)
                })
            },
        },
        Method {
            name: "dag_export",
            summary: "Writes the DAG under a CID as a CAR v1 file on the node's file system (the gateway streams it: GET /ipfs/<cid>?format=car).",
            params: &[
                Param { name: "cid", schema: STRING, required: true, summary: "the root" },
                Param { name: "output", schema: STRING, required: true, summary: "path of the CAR file" },
            ],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(dag_export(ctx, p)),
        },
        Method {
            name: "dag_import",
            summary: "Imports a CAR v1 file (every block verified) and pins its roots.",
            params: &[Param { name: "path", schema: STRING, required: true, summary: "path of the CAR file" }],
            result: r#"{"type":"object"}"#,
            auth: Auth::Admin,
            kind: Kind::Call,
            handler: |ctx, p| Box::pin(dag_import(ctx, p)),
        },
    ],
};

/// A result as JSON (these results always serialize).
fn to_json(value: impl serde::Serialize) -> Result<Value, RpcError> {
    Ok(serde_json::to_value(value).unwrap_or(Value::Null))
}

async fn add(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let state = &ctx.state;
    let request: AddRequest = params(p)?;
    if !request.path.is_absolute() {
        return Err(RpcError::invalid_params("path must be absolute (the node may run in another directory)"));
    }
    let opts = request.import_options().map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let key = match &request.core {
        Some(core) if request.recursive => return Err(RpcError::invalid_params(format!("a private add (core {core}) takes one file, not a tree"))),
        Some(core) => Some(state.client.cores().object_key(super::private::parse_core(core)?).await.map_err(RpcError::core)?),
        None => None,
    };
    let _guard = state.gc_lock.read().await;
    let store = state.store.clone();
    let added = blocking(move || match key {
        Some(key) => super::private::add_file(&store, &request.path, &key, &opts, request.pin),
        None => content::add(&store, &request, &mut |_| {}),
    })
    .await?;
    if let Ok(root) = content::parse_cid(&added.cid) {
        let _ = state.client.content().blocks_added(vec![root]).await;
        let _ = state.client.content().provide(root).await;
    }
    to_json(added)
}

async fn cat(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let (path, source, cid) = resolved(&ctx.state, &p).await?;
    if let Some(core) = p.get("core").and_then(Value::as_str) {
        let data = super::private::read_all(&ctx.state, super::private::parse_core(core)?, cid, MAX_INLINE_CAT).await?;
        return Ok(json!({ "size": data.len(), "data_base64": base64::engine::general_purpose::STANDARD.encode(&data) }));
    }
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

async fn get(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let output = absolute_param(&p, "output")?;
    let (_, source, cid) = resolved(&ctx.state, &p).await?;
    if let Some(core) = p.get("core").and_then(Value::as_str) {
        let bytes = super::private::write_to(&ctx.state, super::private::parse_core(core)?, cid, &output).await?;
        return Ok(json!({ "cid": cid.to_string(), "files": 1, "directories": 0, "symlinks": 0, "bytes": bytes }));
    }
    let report = unixfs::get(&source, cid, &output).await.map_err(RpcError::node)?;
    Ok(json!({ "cid": cid.to_string(), "files": report.files, "directories": report.directories, "symlinks": report.symlinks, "bytes": report.bytes }))
}

async fn stat(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let (_, source, cid) = resolved(&ctx.state, &p).await?;
    let stat = unixfs::stat(&source, cid).await.map_err(RpcError::node)?;
    Ok(json!({ "cid": cid.to_string(), "type": stat.kind.name(), "size": stat.size, "cumulative_size": stat.cumulative_size, "links": stat.blocks }))
}

async fn ls(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let (_, source, cid) = resolved(&ctx.state, &p).await?;
    let entries = unixfs::ls(&source, cid).await.map_err(RpcError::node)?;
    Ok(Value::Array(entries.into_iter().map(|e| json!({ "name": e.name, "cid": e.cid.to_string(), "size": e.tsize })).collect()))
}

async fn pin_add(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let state = &ctx.state;
    let cid = cid_param(&p)?;
    let recursive = match p.get("recursive") {
        None => true,
        Some(Value::Bool(recursive)) => *recursive,
        Some(_) => return Err(RpcError::invalid_params("param 'recursive' must be a boolean")),
    };
    let _guard = state.gc_lock.read().await;
    let source = network(state).await?;
    let entry = content::pin_add(&state.store, &source, cid, recursive).await.map_err(|e| RpcError::node(format!("{e:#}")))?;
    to_json(entry)
}

async fn pin_rm(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let cid = cid_param(&p)?;
    let store = ctx.state.store.clone();
    blocking(move || content::pin_rm(&store, cid)).await?;
    Ok(json!({ "cid": cid.to_string() }))
}

async fn dag_export(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let cid = cid_param(&p)?;
    let output = absolute_param(&p, "output")?;
    let source = network(&ctx.state).await?;
    let file = tokio::fs::File::create(&output).await.map_err(|e| RpcError::node(format!("cannot create {}: {e}", output.display())))?;
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let summary = kubelt_protocol::car::export_car_async(&source, cid, &mut writer).await.map_err(RpcError::node)?;
    tokio::io::AsyncWriteExt::flush(&mut writer).await.map_err(RpcError::node)?;
    Ok(json!({ "root": cid.to_string(), "blocks": summary.blocks, "bytes": summary.bytes }))
}

async fn dag_import(ctx: Ctx, p: Params) -> Result<Value, RpcError> {
    let path = absolute_param(&p, "path")?;
    let _guard = ctx.state.gc_lock.read().await;
    let store = ctx.state.store.clone();
    to_json(blocking(move || content::dag_import(&store, &path)).await?)
}
