//! Gossipsub's message signatures, as the node checks them (`vendor/libp2p-gossipsub`): once per
//! message, after the duplicate check, and before anything trusts the message.
//!
//! A receiver runs gossipsub as a node does (`sync::gossipsub`, the topic's score parameters).
//! A hand-written peer sends it raw RPC frames on `/meshsub/1.1.0`, so it can send what no
//! gossipsub implementation would: a copy of a message under a bad signature, with the message
//! id (source and sequence number) of a good one.
//! - A forged copy arriving *first* must not hide the real message: checked after the duplicate
//!   check but before the message enters the duplicate cache, it is rejected and the real one
//!   still gets through. (Had the patch marked it seen before checking it, anyone could censor
//!   a message by guessing its id.)
//! - A forged copy arriving *after* the real one is a duplicate and is not verified at all, so
//!   it costs the sender no invalid-message penalty. Unpatched gossipsub verifies every copy in
//!   its codec and would penalise it: this is what fails if a libp2p update leaves the patch
//!   unused.
//! - Garbage in a message's source, key or signature (the peer bytes the patched behaviour now
//!   parses on the swarm task) costs that message only: the receiver delivers exactly the
//!   genuinely signed ones and the message after them.

mod common;

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use kubelt_protocol::sync;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{ping, Multiaddr, StreamProtocol, Swarm};
use prost::Message as _;

/// Gossipsub's `Message` (rpc.proto), as it is signed and sent.
#[derive(Clone, PartialEq, prost::Message)]
struct WireMessage {
    #[prost(bytes = "vec", optional, tag = "1")]
    from: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    data: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    seqno: Option<Vec<u8>>,
    #[prost(string, required, tag = "4")]
    topic: String,
    #[prost(bytes = "vec", optional, tag = "5")]
    signature: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "6")]
    key: Option<Vec<u8>>,
}

/// Gossipsub's `RPC`, publishing only.
#[derive(Clone, PartialEq, prost::Message)]
struct WireRpc {
    #[prost(message, repeated, tag = "2")]
    publish: Vec<WireMessage>,
}

/// A message published by `key` on `topic`, signed as gossipsub signs (the `libp2p-pubsub:`
/// prefix before the message without signature and key).
fn signed(key: &Keypair, topic: &IdentTopic, seqno: u64, data: &[u8]) -> WireMessage {
    let mut message = WireMessage {
        from: Some(key.public().to_peer_id().to_bytes()),
        data: Some(data.to_vec()),
        seqno: Some(seqno.to_be_bytes().to_vec()),
        topic: topic.hash().into_string(),
        signature: None,
        key: None,
    };
    let mut signed_bytes = b"libp2p-pubsub:".to_vec();
    signed_bytes.extend_from_slice(&message.encode_to_vec());
    message.signature = Some(key.sign(&signed_bytes).expect("ed25519 signs"));
    message
}

/// The same message id (source and sequence number) with other data and a signature that does
/// not match.
fn forged(real: &WireMessage, data: &[u8]) -> WireMessage {
    WireMessage { data: Some(data.to_vec()), signature: Some(vec![7; 64]), ..real.clone() }
}

/// One length-prefixed RPC frame.
fn frame(messages: Vec<WireMessage>) -> Vec<u8> {
    WireRpc { publish: messages }.encode_length_delimited_to_vec()
}

/// Writes a request's bytes as they are on a `/meshsub/1.1.0` stream; the receiver never
/// answers (reading ends when it closes the stream or the request times out).
#[derive(Clone, Default)]
struct RawFrames;

impl request_response::Codec for RawFrames {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<()> {
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.map(|_| ())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, frame: Vec<u8>) -> std::io::Result<()> {
        io.write_all(&frame).await?;
        io.flush().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, _: &mut T, _: ()) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// The receiver: gossipsub as a node runs it, plus ping.
#[derive(NetworkBehaviour)]
struct Receiver {
    gossipsub: gossipsub::Behaviour<sync::CountingTransform>,
    ping: ping::Behaviour,
}

/// The sender: gossipsub (so that the receiver's own stream to it is accepted and its handler
/// stays up; the sender's subscription tells when its stream is up) and an outbound-only request-response on gossipsub's protocol for raw frames.
#[derive(NetworkBehaviour)]
struct Sender {
    gossipsub: gossipsub::Behaviour<sync::CountingTransform>,
    raw: request_response::Behaviour<RawFrames>,
    ping: ping::Behaviour,
}

/// The two swarms of the test, driven together.
struct Pair {
    receiver: Swarm<Receiver>,
    sender: Swarm<Sender>,
    /// The data of every message the receiver's gossipsub delivered, in order.
    delivered: Vec<Vec<u8>>,
}

impl Pair {
    /// Drives both swarms until `done` holds (checked after every event), or fails after 10 s.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&mut Pair) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            tokio::select! {
                event = self.receiver.select_next_some() => {
                    if let SwarmEvent::Behaviour(ReceiverEvent::Gossipsub(gossipsub::Event::Message { message, .. })) = event {
                        self.delivered.push(message.data);
                    }
                }
                _ = self.sender.select_next_some() => {}
                _ = tokio::time::sleep_until(deadline) => anyhow::bail!("no {what} within 10 s (delivered: {:?})", self.delivered),
            }
        }
        Ok(())
    }

    /// Sends one raw frame and waits until the receiver handled it: a message published
    /// after it in a frame of its own on the same kind of stream is delivered.
    async fn send(&mut self, messages: Vec<WireMessage>, marker: WireMessage) -> anyhow::Result<()> {
        let peer = *self.receiver.local_peer_id();
        let mut bytes = frame(messages);
        bytes.extend(frame(vec![marker.clone()]));
        self.sender.behaviour_mut().raw.send_request(&peer, bytes);
        let data = marker.data.unwrap_or_default();
        self.until("marker message", |p| p.delivered.contains(&data)).await
    }

    fn score(&self) -> f64 {
        self.receiver.behaviour().gossipsub.peer_score(self.sender.local_peer_id()).unwrap_or(0.0)
    }
}

/// A receiver subscribed to `topic` and a sender whose own gossipsub stream to it is up.
async fn connected_pair(topic: &IdentTopic) -> anyhow::Result<(Pair, Keypair)> {
    common::init_tracing();
    let idle = Duration::from_secs(60);
    let mut receiver = common::memory_swarm(Keypair::generate_ed25519(), idle, |key| {
        Ok(Receiver { gossipsub: sync::gossipsub(key, sync::GossipCounters::default(), Duration::from_millis(500))?, ping: ping::Behaviour::default() })
    })?;
    receiver.behaviour_mut().gossipsub.subscribe(topic)?;
    receiver.behaviour_mut().gossipsub.set_topic_params(topic.clone(), sync::topic_score_params()).map_err(anyhow::Error::msg)?;
    let addr: Multiaddr = format!("/memory/{}", common::base_port()).parse()?;
    receiver.listen_on(addr.clone())?;

    let sender_key = Keypair::generate_ed25519();
    let mut sender = common::memory_swarm(sender_key.clone(), idle, |key| {
        Ok(Sender {
            gossipsub: sync::gossipsub(key, sync::GossipCounters::default(), Duration::from_millis(500))?,
            raw: request_response::Behaviour::new(
                [(StreamProtocol::new("/meshsub/1.1.0"), ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            ping: ping::Behaviour::default(),
        })
    })?;
    // The receiver reads one inbound gossipsub stream per connection, the newest: the raw
    // frames must come after the sender's own gossipsub stream is up (its subscription seen).
    sender.behaviour_mut().gossipsub.subscribe(topic)?;
    sender.dial(addr)?;
    let mut pair = Pair { receiver, sender, delivered: Vec::new() };
    let (sender_id, hash) = (*pair.sender.local_peer_id(), topic.hash());
    pair.until("subscription of the sender", |p| p.receiver.behaviour().gossipsub.all_peers().any(|(peer, topics)| *peer == sender_id && topics.contains(&&hash)))
        .await?;

    Ok((pair, sender_key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_copies_neither_hide_a_message_nor_cost_a_second_verification() -> anyhow::Result<()> {
    let topic = IdentTopic::new("kubelt/core/test");
    let (mut pair, sender_key) = connected_pair(&topic).await?;

    // A forged copy first, the real message next, in one frame: the real one is delivered.
    let real = signed(&sender_key, &topic, 1, b"real");
    pair.send(vec![forged(&real, b"forged"), real.clone()], signed(&sender_key, &topic, 2, b"marker 1")).await?;
    assert_eq!(pair.delivered, vec![b"real".to_vec(), b"marker 1".to_vec()], "the forged copy hid the real message");
    let after_forgery = pair.score();
    assert!(after_forgery < 0.0, "the forged copy cost no penalty: score {after_forgery}");

    // The real message again, and a forged copy of it: duplicates, dropped unverified and
    // unpenalised (an invalid delivery would take at least 10 off the score).
    pair.send(vec![real.clone(), forged(&real, b"forged again")], signed(&sender_key, &topic, 3, b"marker 2")).await?;
    assert_eq!(pair.delivered.len(), 3, "a duplicate was delivered: {:?}", pair.delivered);
    let after_duplicates = pair.score();
    assert!(
        after_duplicates > after_forgery - 5.0,
        "a forged duplicate was verified and penalised (score {after_forgery} -> {after_duplicates}): is vendor/libp2p-gossipsub in use?"
    );

    // A forged message with an id never seen is still rejected, and penalised.
    let lone = signed(&sender_key, &topic, 4, b"lone");
    pair.send(vec![forged(&lone, b"lone forged")], signed(&sender_key, &topic, 5, b"marker 3")).await?;
    assert_eq!(pair.delivered.last().map(Vec::as_slice), Some(&b"marker 3"[..]));
    assert!(!pair.delivered.contains(&b"lone forged".to_vec()));
    assert!(pair.score() < after_duplicates - 5.0, "a forged message cost no penalty: score {}", pair.score());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_source_key_and_signature_bytes_cost_one_message_each() -> anyhow::Result<()> {
    use rand::{Rng as _, RngCore as _, SeedableRng as _};
    let topic = IdentTopic::new("kubelt/core/test");
    let (mut pair, sender_key) = connected_pair(&topic).await?;
    // The patched behaviour parses a message's source and key and checks its signature on the
    // swarm task: garbage in each field, with a valid message id, in one frame of 64, on a
    // topic the receiver holds without score parameters (on `topic`, three invalid messages
    // would graylist the sender, and its marker after them would be dropped unread).
    let junk_topic = IdentTopic::new("kubelt/core/junk");
    pair.receiver.behaviour_mut().gossipsub.subscribe(&junk_topic)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let junk = |rng: &mut rand::rngs::StdRng| {
        let mut bytes = vec![0u8; rng.gen_range(0..200)];
        rng.fill_bytes(&mut bytes);
        bytes
    };
    let mut hostile = Vec::new();
    for seqno in 0..64u64 {
        let mut message = signed(&sender_key, &junk_topic, 100 + seqno, format!("hostile {seqno}").as_bytes());
        match seqno % 4 {
            0 => message.from = Some(junk(&mut rng)),
            1 => message.key = Some(junk(&mut rng)),
            2 => message.signature = Some(junk(&mut rng)),
            _ => {
                message.key = Some(junk(&mut rng));
                message.signature = Some(junk(&mut rng));
            }
        }
        hostile.push(message);
    }
    pair.send(hostile, signed(&sender_key, &topic, 1, b"after the junk")).await?;
    // Only the messages whose signature is genuine get through: those with junk in `key`
    // alone. The key field is not signed, and an undecodable one falls back to the key inlined
    // in the (genuine) source, as unpatched gossipsub's codec does.
    let mut expected: Vec<Vec<u8>> = (0..64u64).filter(|n| n % 4 == 1).map(|n| format!("hostile {n}").into_bytes()).collect();
    expected.push(b"after the junk".to_vec());
    assert_eq!(pair.delivered, expected, "the wrong messages got through");
    Ok(())
}
