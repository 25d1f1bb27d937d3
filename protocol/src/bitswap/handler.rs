//! One handler per connection: reads every inbound bitswap stream (Kubo opens a stream per
//! answer and also keeps one open for its wants), and writes our messages.
//!
//! Outbound, our wants travel in order on one long-lived stream (a want and its cancel must not
//! overtake each other), and our answers on up to [`Config::max_response_streams`] more, so a
//! 4 MiB batch of blocks never delays a want. Encoding and block hashing run here, on the
//! connection's task, not on the swarm's.
//!
//! [`Config::max_response_streams`]: super::Config::max_response_streams

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound, ListenUpgradeError,
};
use libp2p::swarm::{ConnectionHandler, ConnectionHandlerEvent, Stream, StreamUpgradeError, SubstreamProtocol};

use super::message::{Message, ReceivedMessage};
use super::protocol::{read_frame, write_frame, BitswapProtocol, FrameError, Version};

/// Which outbound lane a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Carries wantlist entries: the ordered lane.
    Wants,
    /// Blocks and presences only.
    Response,
}

/// A message for the handler to send, with what the behaviour needs back for its accounting.
#[derive(Debug)]
pub struct OutboundMessage {
    pub message: Message,
    pub kind: MessageKind,
    /// The behaviour's size estimate; reported back unchanged.
    pub size: usize,
    /// Already resent once after a broken stream.
    pub retried: bool,
}

impl OutboundMessage {
    pub fn new(message: Message, kind: MessageKind, size: usize) -> Self {
        OutboundMessage { message, kind, size, retried: false }
    }
}

/// From the behaviour.
#[derive(Debug)]
pub enum HandlerIn {
    Send(OutboundMessage),
}

/// To the behaviour.
#[derive(Debug)]
pub enum HandlerOut {
    /// A decoded message, blocks hashed.
    Received(ReceivedMessage),
    /// An inbound stream was dropped: undecodable or oversized frame, or a stream error.
    InboundError(FrameError),
    /// An inbound stream was refused: too many in parallel.
    InboundRefused,
    /// A message was written.
    Sent { kind: MessageKind, size: usize, blocks: usize, block_bytes: usize, version: Version },
    /// A message could not be written (it is dropped).
    SendFailed { kind: MessageKind, size: usize, error: String },
    /// An outbound stream negotiated this version.
    Negotiated(Version),
    /// The remote does not speak bitswap; queued messages were dropped (`dropped_bytes` of
    /// answers among them).
    Unsupported { dropped_response_bytes: usize },
}

/// The handler's share of [`super::Config`].
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub max_message_size: usize,
    pub max_inbound_streams: usize,
    pub max_response_streams: usize,
    pub send_timeout: Duration,
    pub keep_alive: Duration,
}

/// A write's outcome; on failure on a reused stream, the message comes back for one retry on a
/// fresh stream (the remote may have reset the old one, e.g. after refusing a frame).
type WriteFuture = BoxFuture<'static, (Result<Stream, FrameError>, Sent, Option<OutboundMessage>)>;

/// What a finished write reports.
#[derive(Debug, Clone, Copy)]
struct Sent {
    kind: MessageKind,
    size: usize,
    blocks: usize,
    block_bytes: usize,
    version: Version,
}

enum Lane {
    /// No stream.
    Closed,
    /// A stream was requested from the swarm.
    Opening,
    /// A negotiated stream; `bool`: it already carried a message.
    Idle(Stream, Version, bool),
    Writing(WriteFuture),
}

impl Lane {
    fn is_idle(&self) -> bool {
        matches!(self, Lane::Idle(..))
    }
}

/// The [`ConnectionHandler`] of bitswap.
pub struct Handler {
    config: HandlerConfig,
    inbound: SelectAll<BoxStream<'static, Result<ReceivedMessage, FrameError>>>,
    /// Lane 0 carries wants; lanes 1.. carry answers.
    lanes: Vec<Lane>,
    want_queue: VecDeque<OutboundMessage>,
    response_queue: VecDeque<OutboundMessage>,
    events: VecDeque<HandlerOut>,
    version: Option<Version>,
    unsupported: bool,
    keep_alive_until: Option<Instant>,
}

impl Handler {
    pub fn new(config: HandlerConfig) -> Self {
        let lanes = (0..=config.max_response_streams.max(1)).map(|_| Lane::Closed).collect();
        Handler {
            config,
            inbound: SelectAll::new(),
            lanes,
            want_queue: VecDeque::new(),
            response_queue: VecDeque::new(),
            events: VecDeque::new(),
            version: None,
            unsupported: false,
            keep_alive_until: None,
        }
    }

    fn queue_for(&mut self, lane: usize) -> &mut VecDeque<OutboundMessage> {
        if lane == 0 {
            &mut self.want_queue
        } else {
            &mut self.response_queue
        }
    }

    fn start_write(&self, stream: Stream, version: Version, used: bool, msg: OutboundMessage) -> WriteFuture {
        let timeout = self.config.send_timeout;
        let sent = Sent {
            kind: msg.kind,
            size: msg.size,
            blocks: msg.message.blocks.len(),
            block_bytes: msg.message.blocks.iter().map(|b| b.data.len()).sum(),
            version,
        };
        let max = self.config.max_message_size;
        async move {
            let mut stream = stream;
            let frame = msg.message.encode_frame(version);
            if frame.len() > max + 10 {
                return (Err(FrameError::TooLarge { len: frame.len(), max }), sent, None);
            }
            match tokio::time::timeout(timeout, write_frame(&mut stream, &frame)).await {
                Ok(Ok(())) => (Ok(stream), sent, None),
                Ok(Err(e)) => (Err(e), sent, (used && !msg.retried).then(|| OutboundMessage { retried: true, ..msg })),
                Err(_) => (Err(FrameError::Timeout(timeout)), sent, None),
            }
        }
        .boxed()
    }

    fn drop_all_queued(&mut self) -> usize {
        self.want_queue.clear();
        self.response_queue.drain(..).map(|m| m.size).sum()
    }
}

/// Reads frames from one inbound stream until it ends or fails.
fn inbound_messages(stream: Stream, max: usize) -> BoxStream<'static, Result<ReceivedMessage, FrameError>> {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match read_frame(&mut stream, max).await {
            Ok(Some(frame)) => match ReceivedMessage::decode(frame) {
                Ok(msg) => Some((Ok(msg), Some(stream))),
                Err(e) => Some((Err(e), None)),
            },
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

impl ConnectionHandler for Handler {
    type FromBehaviour = HandlerIn;
    type ToBehaviour = HandlerOut;
    type InboundProtocol = BitswapProtocol;
    type OutboundProtocol = BitswapProtocol;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = usize;

    fn listen_protocol(&self) -> SubstreamProtocol<BitswapProtocol> {
        SubstreamProtocol::new(BitswapProtocol, ())
    }

    fn on_behaviour_event(&mut self, event: HandlerIn) {
        match event {
            HandlerIn::Send(msg) => {
                if self.unsupported {
                    let size = if msg.kind == MessageKind::Response { msg.size } else { 0 };
                    self.events.push_back(HandlerOut::Unsupported { dropped_response_bytes: size });
                    return;
                }
                if msg.kind == MessageKind::Wants {
                    self.keep_alive_until = Some(Instant::now() + self.config.keep_alive);
                    self.want_queue.push_back(msg);
                } else {
                    self.response_queue.push_back(msg);
                }
            }
        }
    }

    fn connection_keep_alive(&self) -> bool {
        !self.want_queue.is_empty()
            || !self.response_queue.is_empty()
            || self.lanes.iter().any(|l| matches!(l, Lane::Opening | Lane::Writing(_)))
            || self.keep_alive_until.is_some_and(|t| Instant::now() < t)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<BitswapProtocol, usize, HandlerOut>> {
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(ev));
        }

        // Outbound lanes.
        for i in 0..self.lanes.len() {
            loop {
                match std::mem::replace(&mut self.lanes[i], Lane::Closed) {
                    Lane::Writing(mut fut) => match fut.poll_unpin(cx) {
                        Poll::Pending => {
                            self.lanes[i] = Lane::Writing(fut);
                            break;
                        }
                        Poll::Ready((Ok(stream), sent, _)) => {
                            self.lanes[i] = Lane::Idle(stream, sent.version, true);
                            self.events.push_back(HandlerOut::Sent {
                                kind: sent.kind,
                                size: sent.size,
                                blocks: sent.blocks,
                                block_bytes: sent.block_bytes,
                                version: sent.version,
                            });
                        }
                        Poll::Ready((Err(e), _, Some(retry))) => {
                            tracing::debug!(error = %e, "bitswap stream broke; resending on a new one");
                            self.queue_for(i).push_front(retry);
                        }
                        Poll::Ready((Err(e), sent, None)) => {
                            tracing::debug!(error = %e, "bitswap send failed");
                            self.events.push_back(HandlerOut::SendFailed { kind: sent.kind, size: sent.size, error: e.to_string() });
                        }
                    },
                    Lane::Idle(stream, version, used) => match self.queue_for(i).pop_front() {
                        Some(msg) => self.lanes[i] = Lane::Writing(self.start_write(stream, version, used, msg)),
                        None => {
                            self.lanes[i] = Lane::Idle(stream, version, used);
                            break;
                        }
                    },
                    Lane::Opening => {
                        self.lanes[i] = Lane::Opening;
                        break;
                    }
                    Lane::Closed => {
                        let pending = self.queue_for(i).len();
                        // An answer lane opens only if no other answer lane is idle and more
                        // answers wait than lanes are being opened.
                        let wanted = pending > 0
                            && !self.unsupported
                            && (i == 0
                                || (!self.lanes[1..].iter().any(Lane::is_idle)
                                    && self.lanes[1..].iter().filter(|l| matches!(l, Lane::Opening)).count() < pending));
                        if wanted {
                            self.lanes[i] = Lane::Opening;
                            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                                protocol: SubstreamProtocol::new(BitswapProtocol, i),
                            });
                        }
                        break;
                    }
                }
            }
        }
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(ev));
        }

        // Inbound streams.
        if !self.inbound.is_empty() {
            if let Poll::Ready(Some(item)) = self.inbound.poll_next_unpin(cx) {
                let ev = match item {
                    Ok(msg) => HandlerOut::Received(msg),
                    Err(e) => HandlerOut::InboundError(e),
                };
                return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(ev));
            }
        }
        Poll::Pending
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<BitswapProtocol, BitswapProtocol, (), usize>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: (mut stream, _version), .. }) => {
                if self.inbound.len() >= self.config.max_inbound_streams {
                    tracing::debug!(limit = self.config.max_inbound_streams, "too many inbound bitswap streams, refusing one");
                    self.events.push_back(HandlerOut::InboundRefused);
                    return;
                }
                // Inbound streams may stay open for good (Kubo keeps one); they alone should
                // not keep an otherwise idle connection.
                stream.ignore_for_keep_alive();
                self.inbound.push(inbound_messages(stream, self.config.max_message_size));
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: (mut stream, version), info }) => {
                stream.ignore_for_keep_alive();
                if self.version != Some(version) {
                    self.version = Some(version);
                    self.events.push_back(HandlerOut::Negotiated(version));
                }
                if let Some(lane) = self.lanes.get_mut(info) {
                    *lane = Lane::Idle(stream, version, false);
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                if let Some(lane) = self.lanes.get_mut(info) {
                    *lane = Lane::Closed;
                }
                match error {
                    StreamUpgradeError::NegotiationFailed => {
                        self.unsupported = true;
                        let dropped = self.drop_all_queued();
                        self.events.push_back(HandlerOut::Unsupported { dropped_response_bytes: dropped });
                    }
                    other => {
                        // Drop the head message of that lane so a broken peer cannot pile up a
                        // queue; the requesting side retries on its timeouts.
                        if let Some(msg) = self.queue_for(info).pop_front() {
                            self.events.push_back(HandlerOut::SendFailed { kind: msg.kind, size: msg.size, error: other.to_string() });
                        }
                    }
                }
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { error, .. }) => {
                tracing::debug!(?error, "inbound bitswap stream upgrade failed");
            }
            _ => {}
        }
    }
}
