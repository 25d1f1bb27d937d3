//! Private objects on the admin side: adding a file encrypted under a core's data key
//! (`content_add` with `core`), reading one back decrypted (`content_cat`/`content_get` with
//! `core`, and `GET /private/<core>/<cid>`, which streams it with the API secret), and the
//! errors of each.
//!
//! The format is `kubelt_protocol::core::private::object` (`kbobj1`). Decryption needs the
//! data key the object's header names, which only the core's devices (and nodes the owner
//! unlocked) hold: the node asks its event loop for it, and a node without it answers
//! -32016 (encrypted). The gateway is not involved: it serves the ciphertext like any content
//! and never decrypts.

use std::io::Read;
use std::path::Path;
use std::pin::Pin;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use kubelt_protocol::core::private::object::{encrypt_chunks, Decryptor, Header, ObjectError, ObjectKey, HEADER_LEN};
use kubelt_protocol::core::Address;
use kubelt_protocol::node::{Client, CoreCommandError};
use kubelt_protocol::store::{PinKind, Store};
use kubelt_protocol::unixfs::{self, ImportOptions, Imported};

use super::{code, ApiState, Gate, RpcError};

/// Why a private object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The blocks could not be read.
    #[error("{0}")]
    Source(String),
    /// No key, core not held, node stopped.
    #[error(transparent)]
    Core(#[from] CoreCommandError),
    /// Not a private object, or it does not decrypt.
    #[error(transparent)]
    Object(#[from] ObjectError),
}

impl From<ReadError> for RpcError {
    fn from(e: ReadError) -> RpcError {
        match e {
            ReadError::Source(message) => RpcError::node(message),
            ReadError::Core(c) => RpcError::core(c),
            ReadError::Object(ObjectError::NotPrivate) => RpcError::invalid_params(format!("{e}: read it without a core")),
            ReadError::Object(o) => RpcError::new(code::CORE_UNDECRYPTABLE, o.to_string()),
        }
    }
}

/// The core named by a `core` param or path segment.
pub fn parse_core(text: &str) -> Result<Address, RpcError> {
    Address::parse(text).map_err(|e| RpcError::invalid_params(format!("invalid core address '{text}': {e}")))
}

/// Chunks of ciphertext (64 KiB each) the encrypting thread may run ahead of the importer: two
/// hash batches' worth (4 MiB), so that it goes on while the importer hashes one.
const PIPELINE_CHUNKS: usize = 64;

/// Imports `reader`'s bytes encrypted under `key` as one UnixFS file (not pinned). Blocking;
/// constant memory whatever the size. The encryption runs on a thread of its own, a few
/// chunks ahead of the importer, so that it overlaps the hashing instead of adding to it.
pub fn add_encrypted(store: &Store, reader: impl Read + Send, key: &ObjectKey, opts: &ImportOptions) -> anyhow::Result<Imported> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(PIPELINE_CHUNKS);
    std::thread::scope(|scope| {
        let encrypting = std::thread::Builder::new().name("kbobj1-encrypt".into()).spawn_scoped(scope, move || {
            // The importer stopped (it failed) when a send fails: nothing more to do.
            if let Err(e) = encrypt_chunks(reader, key, |piece| tx.send(Ok(piece)).is_ok()) {
                let _ = tx.send(Err(e));
            }
        });
        if let Err(e) = encrypting {
            anyhow::bail!("cannot start the encrypting thread: {e}");
        }
        Ok(unixfs::add_file(store, ChannelReader { rx, current: Vec::new(), at: 0 }, opts, &mut |_| {})?)
    })
}

/// A [`Read`] of the chunks another thread sends; the end when it stops sending.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Adds the file at `path` for `content_add` with a `core`.
pub fn add_file(store: &Store, path: &Path, key: &ObjectKey, opts: &ImportOptions, pin: bool) -> anyhow::Result<crate::content::Added> {
    use anyhow::Context;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot add {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a file: a private add takes one file (put a directory in an archive first)", path.display());
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // No buffering: the encryption reads 64 KiB at a time.
    let imported = add_encrypted(store, file, key, opts)?;
    if pin {
        store.pin(&imported.cid, PinKind::Recursive)?;
    } else {
        store.flush()?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    Ok(crate::content::Added { cid: imported.cid.to_string(), size: imported.size, name })
}

/// The plaintext of the private object of `core` that `input` (its ciphertext, in pieces of
/// any size) carries, in pieces as they decrypt. The key is asked of the node once the header
/// is read; an error ends the stream.
pub fn decrypt<S, E>(client: Client, core: Address, input: S) -> impl Stream<Item = Result<Bytes, ReadError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let state = Decrypting { input: Box::pin(input), client, core, header: Vec::with_capacity(HEADER_LEN), decryptor: None, done: false };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let mut out = Vec::new();
            match st.step(&mut out).await {
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Ok(ended) => {
                    st.done = ended;
                    if !out.is_empty() || ended {
                        return Some((Ok(Bytes::from(out)), st));
                    }
                }
            }
        }
    })
}

/// The state of [`decrypt`].
struct Decrypting<S> {
    input: Pin<Box<S>>,
    client: Client,
    core: Address,
    /// The header, until it is complete.
    header: Vec<u8>,
    decryptor: Option<Decryptor>,
    done: bool,
}

impl<S, E> Decrypting<S>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    /// Takes the next piece of ciphertext, appending what decrypts to `out`; `true` at the end.
    async fn step(&mut self, out: &mut Vec<u8>) -> Result<bool, ReadError> {
        let piece = match self.input.next().await {
            Some(Err(e)) => return Err(ReadError::Source(e.to_string())),
            Some(Ok(piece)) => piece,
            None => {
                let Some(decryptor) = self.decryptor.take() else {
                    return Err(Header::parse(&self.header).err().unwrap_or(ObjectError::Truncated).into());
                };
                decryptor.finish(out)?;
                return Ok(true);
            }
        };
        if let Some(decryptor) = self.decryptor.as_mut() {
            decryptor.update(&piece, out)?;
            return Ok(false);
        }
        let take = (HEADER_LEN - self.header.len()).min(piece.len());
        self.header.extend_from_slice(&piece[..take]);
        if self.header.len() < HEADER_LEN {
            // A plain file is refused at once rather than at its end.
            if let Err(ObjectError::NotPrivate) = Header::parse(&self.header) {
                return Err(ObjectError::NotPrivate.into());
            }
            return Ok(false);
        }
        let header = Header::parse(&self.header)?;
        let key = self.client.cores().object_key_by_id(self.core, header.key_id).await?;
        let mut decryptor = Decryptor::new(&header, &key);
        decryptor.update(&piece[take..], out)?;
        self.decryptor = Some(decryptor);
        Ok(false)
    }
}

/// Reads the whole private object `cid` of `core`, decrypted, refusing one whose plaintext
/// passes `limit` bytes.
pub async fn read_all(state: &ApiState, core: Address, cid: cid::Cid, limit: u64) -> Result<Vec<u8>, RpcError> {
    let source = super::content::network(state).await?;
    let mut stream = Box::pin(decrypt(state.client.clone(), core, unixfs::cat(source, cid)));
    let mut data = Vec::new();
    while let Some(piece) = stream.next().await {
        data.extend_from_slice(&piece?);
        if data.len() as u64 > limit {
            return Err(RpcError::node(format!("the object is larger than {limit} bytes")));
        }
    }
    Ok(data)
}

/// Writes the private object `cid` of `core`, decrypted, to a new file at `output` (which must
/// not exist). Returns the bytes written. A file that fails half-way is removed.
pub async fn write_to(state: &ApiState, core: Address, cid: cid::Cid, output: &Path) -> Result<u64, RpcError> {
    use tokio::io::AsyncWriteExt;
    let source = super::content::network(state).await?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .await
        .map_err(|e| RpcError::node(format!("cannot create {}: {e}", output.display())))?;
    let mut stream = Box::pin(decrypt(state.client.clone(), core, unixfs::cat(source, cid)));
    let mut written = 0u64;
    let result: Result<(), RpcError> = async {
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            file.write_all(&piece).await.map_err(|e| RpcError::node(format!("cannot write {}: {e}", output.display())))?;
            written += piece.len() as u64;
        }
        file.flush().await.map_err(RpcError::node)?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(file);
        let _ = tokio::fs::remove_file(output).await;
        return Err(e);
    }
    Ok(written)
}

/// `GET /private/<core>/<cid>` on the admin API, with its secret: the object decrypted, as a
/// stream. Errors are a status and the JSON-RPC error's message (the code in
/// `X-Kubelt-Error-Code`).
pub async fn get_private(State(state): State<ApiState>, UrlPath((core, cid)): UrlPath<(String, String)>, headers: HeaderMap) -> Response {
    let Gate::Admin { secret } = &state.gate else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    if !super::authorized(&headers, None, secret) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong API secret (Authorization: Bearer <contents of <repo>/api.cookie>)\n").into_response();
    }
    match start_stream(&state, &core, &cid).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

fn error_response(e: &RpcError) -> Response {
    let status = match e.code {
        code::INVALID_PARAMS => StatusCode::BAD_REQUEST,
        code::CORE_ENCRYPTED | code::CORE_NOT_HELD => StatusCode::FORBIDDEN,
        code::CORE_UNDECRYPTABLE => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut response = (status, format!("{}\n", e.message)).into_response();
    response.headers_mut().insert("x-kubelt-error-code", HeaderValue::from(e.code));
    response
}

/// Starts the decrypted stream once its first piece (the header and the key) is through, so
/// that a missing key or a plain file is an HTTP error, not a cut-off body.
async fn start_stream(state: &ApiState, core: &str, cid: &str) -> Result<Response, RpcError> {
    let core = parse_core(core)?;
    let cid = crate::content::parse_cid(cid).map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let source = super::content::network(state).await?;
    let mut stream = Box::pin(decrypt(state.client.clone(), core, unixfs::cat(source, cid)));
    let first = match stream.next().await {
        None => Bytes::new(),
        Some(piece) => piece?,
    };
    let rest = stream.map(|r| r.map_err(std::io::Error::other));
    let body = Body::from_stream(futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(rest));
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response)
}
