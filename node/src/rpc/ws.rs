//! JSON-RPC over WebSocket: the same calls as over HTTP, plus subscriptions.
//!
//! The upgrade is `GET /` on the API's port, behind the same `Host` check; the admin secret
//! comes as `Authorization: Bearer` or, for browsers, which cannot set headers on a
//! WebSocket, as the `access_token` query parameter. Each text (or binary) message is one call
//! or a batch, answered by one message; a subscription then sends its notifications on the
//! same connection, as `eth_subscribe` does:
//! `{"jsonrpc":"2.0","method":"core_subscription","params":{"subscription":"0x…","result":…}}`.
//!
//! Everything a connection holds is bounded, and every way it is dropped says why in the
//! close frame:
//! - a message over [`MAX_REQUEST_BYTES`]: close 1009;
//! - at most [`MAX_IN_FLIGHT`] calls run at once; past that the connection stops reading, so a
//!   client that sends faster than its calls finish is slowed down by TCP, not buffered;
//! - what waits to be sent is at most [`OUTBOX_MESSAGES`] messages and [`OUTBOX_BYTES`]
//!   bytes. A client that does not read its replies or notifications fast enough is closed
//!   with 1008 "too slow" rather than buffered without bound; its subscriptions end with it,
//!   and every other connection goes on;
//! - [`MAX_SUBSCRIPTIONS`] per connection and [`MAX_CONNECTIONS`] per node (-32005 past either);
//! - the node stopping: 1001.
//!
//! A subscription is a task that forwards its stream into the connection's outbox. Its first
//! notification is sent only after the reply carrying its id, so a client never sees an id it
//! has not been given yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::registry::Ctx;
use super::{authorized, code, jsonrpc, unauthorized, ApiState, RpcError, MAX_REQUEST_BYTES};

/// Calls of one connection that run at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Messages of one connection waiting to be sent.
pub const OUTBOX_MESSAGES: usize = 256;
/// Bytes of one connection waiting to be sent (one message larger than this still goes out
/// when nothing else waits).
pub const OUTBOX_BYTES: usize = 64 << 20;
/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// WebSocket connections the node serves at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a closing connection tries to deliver its close frame to a client that is not
/// reading, before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The node's WebSocket connections: the limit on their number and counters for `/metrics`.
pub struct Websockets {
    permits: Arc<Semaphore>,
    /// Connections closed because the client did not read fast enough.
    pub closed_too_slow: AtomicU64,
    /// Subscriptions open now, over every connection.
    pub subscriptions: AtomicUsize,
}

impl Default for Websockets {
    fn default() -> Self {
        Websockets { permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)), closed_too_slow: AtomicU64::new(0), subscriptions: AtomicUsize::new(0) }
    }
}

impl Websockets {
    /// Connections open now.
    pub fn open(&self) -> usize {
        MAX_CONNECTIONS - self.permits.available_permits()
    }
}

#[derive(serde::Deserialize)]
pub(super) struct UpgradeQuery {
    access_token: Option<String>,
}

/// `GET /`: checks the secret and upgrades to a WebSocket.
pub(super) async fn upgrade(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<UpgradeQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        let text = "GET / opens a JSON-RPC WebSocket ('Upgrade: websocket'); send single calls with POST /\n";
        return (StatusCode::BAD_REQUEST, text).into_response();
    };
    let query_token = query.as_ref().ok().and_then(|q| q.access_token.as_deref());
    if !authorized(&headers, query_token, &state.secret) {
        return unauthorized();
    }
    let Ok(permit) = state.websockets.permits.clone().try_acquire_owned() else {
        let error = RpcError::new(code::LIMIT_REACHED, format!("the node serves at most {MAX_CONNECTIONS} WebSocket connections; try again later"));
        return (StatusCode::SERVICE_UNAVAILABLE, Json(jsonrpc::error_response(Value::Null, error))).into_response();
    };
    upgrade
        .max_message_size(MAX_REQUEST_BYTES)
        .max_frame_size(MAX_REQUEST_BYTES)
        .on_upgrade(move |socket| connection(socket, state, permit))
}

/// Why a connection closes: the close frame's code and reason.
#[derive(Debug, Clone)]
struct Close {
    code: u16,
    reason: String,
}

/// What the reader, the writer and the subscription tasks of one connection share.
struct Shared {
    outbox: mpsc::Sender<String>,
    /// Bytes in `outbox`, not yet taken by the writer.
    queued_bytes: AtomicUsize,
    closing: CancellationToken,
    close: Mutex<Option<Close>>,
}

/// The outbox refused a message: the client is not reading fast enough.
struct TooSlow;

impl Shared {
    /// Queues a message, or refuses it when the client has left too much unread.
    fn push(&self, message: String) -> Result<(), TooSlow> {
        let len = message.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::SeqCst);
        if before > 0 && before + len > OUTBOX_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::SeqCst);
            return Err(TooSlow);
        }
        self.outbox.try_send(message).map_err(|_| {
            self.queued_bytes.fetch_sub(len, Ordering::SeqCst);
            TooSlow
        })
    }

    /// Closes the connection; the first reason given is the one sent.
    fn close(&self, code: u16, reason: impl Into<String>) {
        if let Ok(mut close) = self.close.lock() {
            close.get_or_insert_with(|| Close { code, reason: reason.into() });
        }
        self.closing.cancel();
    }

    /// Closes the connection of a client that left too much unread.
    fn close_too_slow(&self, websockets: &Websockets) {
        websockets.closed_too_slow.fetch_add(1, Ordering::Relaxed);
        let waiting = self.outbox.max_capacity() - self.outbox.capacity();
        tracing::info!("closing a WebSocket whose client does not read: {waiting} messages waiting");
        self.close(
            close_code::POLICY,
            format!("too slow: {waiting} messages unread (at most {OUTBOX_MESSAGES} or {} MiB wait)", OUTBOX_BYTES >> 20),
        );
    }
}

/// One connection's subscriptions.
struct Session {
    shared: Arc<Shared>,
    websockets: Arc<Websockets>,
    subscriptions: Mutex<HashMap<String, AbortOnDropHandle<()>>>,
}

impl Session {
    /// A connection's session, and the queue its writer sends from.
    fn new(websockets: Arc<Websockets>) -> (Arc<Session>, mpsc::Receiver<String>) {
        let (outbox, queue) = mpsc::channel(OUTBOX_MESSAGES);
        let shared = Arc::new(Shared { outbox, queued_bytes: AtomicUsize::new(0), closing: CancellationToken::new(), close: Mutex::new(None) });
        (Arc::new(Session { shared, websockets, subscriptions: Default::default() }), queue)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let open = self.subscriptions.get_mut().map(|s| s.len()).unwrap_or(0);
        self.websockets.subscriptions.fetch_sub(open, Ordering::Relaxed);
    }
}

/// A call's view of its connection, handed to handlers in [`Ctx::session`]. Subscriptions it
/// opens start once the call's reply is queued.
#[derive(Clone)]
pub struct CallScope {
    session: Arc<Session>,
    starts: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
}

impl CallScope {
    fn new(session: Arc<Session>) -> Self {
        CallScope { session, starts: Default::default() }
    }

    /// Opens a subscription that sends each item of `stream` as a `notification` call, and
    /// returns its id. An error item is sent as the last notification (with `error` instead of
    /// `result`) and ends the subscription.
    pub fn subscribe(&self, notification: &'static str, stream: BoxStream<'static, Result<Value, RpcError>>) -> Result<String, RpcError> {
        let session = &self.session;
        let mut subscriptions = session.subscriptions.lock().map_err(|_| RpcError::new(code::INTERNAL_ERROR, "subscriptions lock poisoned"))?;
        let before = subscriptions.len();
        subscriptions.retain(|_, task| !task.is_finished());
        session.websockets.subscriptions.fetch_sub(before - subscriptions.len(), Ordering::Relaxed);
        if subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(RpcError::new(code::LIMIT_REACHED, format!("a connection holds at most {MAX_SUBSCRIPTIONS} subscriptions; end one with its unsubscribe method")));
        }
        let id = loop {
            let id = format!("0x{:016x}", rand::random::<u64>());
            if !subscriptions.contains_key(&id) {
                break id;
            }
        };
        let (start, started) = oneshot::channel();
        if let Ok(mut starts) = self.starts.lock() {
            starts.push(start);
        }
        let task = tokio::spawn(forward(session.shared.clone(), session.websockets.clone(), id.clone(), notification, stream, started));
        subscriptions.insert(id.clone(), AbortOnDropHandle::new(task));
        session.websockets.subscriptions.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Ends a subscription of this connection; `false` when it has none by that id.
    pub fn unsubscribe(&self, id: &str) -> bool {
        let Ok(mut subscriptions) = self.session.subscriptions.lock() else { return false };
        match subscriptions.remove(id) {
            Some(task) => {
                self.session.websockets.subscriptions.fetch_sub(1, Ordering::Relaxed);
                !task.is_finished()
            }
            None => false,
        }
    }

    /// Lets the subscriptions this call opened send (its reply is queued).
    fn start_subscriptions(&self) {
        if let Ok(mut starts) = self.starts.lock() {
            for start in starts.drain(..) {
                let _ = start.send(());
            }
        }
    }
}

/// Sends a subscription's items as notifications until it ends or the connection closes.
async fn forward(
    shared: Arc<Shared>,
    websockets: Arc<Websockets>,
    id: String,
    notification: &'static str,
    mut stream: BoxStream<'static, Result<Value, RpcError>>,
    started: oneshot::Receiver<()>,
) {
    if started.await.is_err() {
        return;
    }
    while let Some(item) = stream.next().await {
        let (params, last) = match item {
            Ok(result) => (json!({ "subscription": id, "result": result }), false),
            Err(error) => (json!({ "subscription": id, "error": { "code": error.code, "message": error.message } }), true),
        };
        let message = json!({ "jsonrpc": "2.0", "method": notification, "params": params }).to_string();
        if shared.push(message).is_err() {
            shared.close_too_slow(&websockets);
            return;
        }
        if last {
            return;
        }
    }
}

/// Serves one connection until the client leaves, it is closed for a reason, or the node stops.
async fn connection(socket: WebSocket, state: ApiState, _permit: OwnedSemaphorePermit) {
    let (sink, stream) = socket.split();
    let (session, queue) = Session::new(state.websockets.clone());
    let shared = session.shared.clone();
    tokio::join!(read(stream, state, session), write(sink, queue, shared));
}

/// Reads calls, runs up to [`MAX_IN_FLIGHT`] at once, queues their replies.
async fn read(mut stream: futures::stream::SplitStream<WebSocket>, state: ApiState, session: Arc<Session>) {
    let shared = session.shared.clone();
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = shared.closing.cancelled() => break,
            _ = state.shutdown.cancelled() => {
                shared.close(close_code::AWAY, "the node is shutting down");
                break;
            }
            Some((reply, scope)) = in_flight.next(), if !in_flight.is_empty() => {
                let scope: CallScope = scope;
                if let Some(reply) = reply {
                    if shared.push(Value::to_string(&reply)).is_err() {
                        shared.close_too_slow(&state.websockets);
                        break;
                    }
                }
                scope.start_subscriptions();
            }
            message = stream.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                let body = match message {
                    Some(Ok(Message::Text(text))) => axum::body::Bytes::from(text),
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => {
                        shared.close(close_code::NORMAL, "");
                        break;
                    }
                    Some(Err(error)) => {
                        let (code, reason) = read_error(error);
                        shared.close(code, reason);
                        break;
                    }
                };
                let scope = CallScope::new(session.clone());
                let ctx = Ctx::admin(state.clone(), Some(scope.clone()));
                in_flight.push(async move { (jsonrpc::run_body(&ctx, &body).await, scope) });
            }
        }
    }
}

/// The close frame for a failed read: a message over the size limit, or a broken stream.
fn read_error(error: axum::Error) -> (u16, String) {
    let too_large = error
        .into_inner()
        .downcast::<tungstenite::Error>()
        .is_ok_and(|error| matches!(*error, tungstenite::Error::Capacity(_)));
    if too_large {
        (close_code::SIZE, format!("request too large: a message is at most {MAX_REQUEST_BYTES} bytes (2 MiB)"))
    } else {
        (close_code::PROTOCOL, "not a valid WebSocket stream".to_string())
    }
}

/// Sends what the outbox holds until the connection closes, then the close frame.
async fn write(mut sink: futures::stream::SplitSink<WebSocket, Message>, mut queue: mpsc::Receiver<String>, shared: Arc<Shared>) {
    loop {
        let message = tokio::select! {
            biased;
            _ = shared.closing.cancelled() => break,
            message = queue.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        shared.queued_bytes.fetch_sub(message.len(), Ordering::SeqCst);
        tokio::select! {
            biased;
            _ = shared.closing.cancelled() => break,
            sent = sink.send(Message::Text(message.into())) => if sent.is_err() {
                shared.close(close_code::ABNORMAL, "");
                return;
            },
        }
    }
    // What was queued is dropped now; only the close frame waits for the client.
    drop(queue);
    let close = shared.close.lock().ok().and_then(|close| close.clone()).unwrap_or(Close { code: close_code::NORMAL, reason: String::new() });
    let frame = CloseFrame { code: close.code, reason: close.reason.into() };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.close().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(count: u64) -> BoxStream<'static, Result<Value, RpcError>> {
        futures::stream::iter((0..count).map(|n| Ok(Value::from(n)))).boxed()
    }

    #[tokio::test]
    async fn notifications_wait_for_the_reply_then_come_in_order_and_an_error_ends_them() {
        let (session, mut queue) = Session::new(Default::default());
        let scope = CallScope::new(session.clone());
        let items = futures::stream::iter(vec![Ok(json!("a")), Ok(json!("b")), Err(RpcError::new(code::SUBSCRIPTION_ENDED, "behind")), Ok(json!("c"))]);
        let id = scope.subscribe("test_subscription", items.boxed()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(queue.try_recv().is_err(), "a notification went out before the reply that names its id");
        scope.start_subscriptions();
        let mut got = vec![];
        for _ in 0..3 {
            let message: Value = serde_json::from_str(&queue.recv().await.unwrap()).unwrap();
            assert_eq!((&message["method"], &message["params"]["subscription"]), (&json!("test_subscription"), &json!(id)));
            got.push(message["params"].clone());
        }
        assert_eq!(got[0]["result"], "a");
        assert_eq!(got[1]["result"], "b");
        assert_eq!(got[2]["error"]["code"], code::SUBSCRIPTION_ENDED);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(queue.try_recv().is_err(), "an item after the error was sent");
        assert!(!scope.unsubscribe(&id), "an ended subscription was still running");
        assert!(!scope.unsubscribe("0x0"));
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_closed_as_too_slow_and_nothing_more_is_queued() {
        let websockets: Arc<Websockets> = Default::default();
        let (session, queue) = Session::new(websockets.clone());
        let scope = CallScope::new(session.clone());
        scope.subscribe("test_subscription", numbers(10_000)).unwrap();
        scope.start_subscriptions();
        tokio::time::timeout(Duration::from_secs(10), session.shared.closing.cancelled()).await.unwrap();
        let close = session.shared.close.lock().unwrap().clone().unwrap();
        assert_eq!(close.code, close_code::POLICY);
        assert!(close.reason.starts_with("too slow"), "{}", close.reason);
        assert!(close.reason.len() <= 123, "a close reason is at most 123 bytes: {}", close.reason);
        assert_eq!(queue.len(), OUTBOX_MESSAGES);
        assert_eq!(websockets.closed_too_slow.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn subscriptions_are_capped_per_connection_and_counted() {
        let websockets: Arc<Websockets> = Default::default();
        let (session, _queue) = Session::new(websockets.clone());
        let scope = CallScope::new(session.clone());
        let pending = || futures::stream::pending().boxed();
        let ids: Vec<String> = (0..MAX_SUBSCRIPTIONS).map(|_| scope.subscribe("s", pending()).unwrap()).collect();
        let error = scope.subscribe("s", pending()).unwrap_err();
        assert_eq!(error.code, code::LIMIT_REACHED);
        assert_eq!(websockets.subscriptions.load(Ordering::Relaxed), MAX_SUBSCRIPTIONS);
        assert!(scope.unsubscribe(&ids[0]));
        assert!(!scope.unsubscribe(&ids[0]));
        scope.subscribe("s", pending()).unwrap();
        drop((scope, session));
        assert_eq!(websockets.subscriptions.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_large_message_passes_an_empty_outbox_but_not_a_full_one() {
        let (session, _queue) = Session::new(Default::default());
        let big = "x".repeat(OUTBOX_BYTES + 1);
        assert!(session.shared.push(big.clone()).is_ok());
        assert!(session.shared.push("small".to_string()).is_err());
    }
}
