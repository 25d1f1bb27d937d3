//! Messages between cores, with real nodes in this process on the memory transport: delivery
//! to an online recipient, to a follower while the recipient's only device is offline, the
//! outbox across a restart, and a hostile peer's envelopes (forged, revoked, for a core not
//! held, malformed, oversized, a flood), each refused while the node keeps serving.

mod common;

use common::{base_port, init_tracing};

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use kubelt_proto::msg::{msg_request, outcome, Deliver, Envelope, MsgRequest, MsgResponse};
use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::msg::envelope;
use kubelt_protocol::node::{Config, InboxMessage, Node, NodeEvent};
use kubelt_protocol::store::Store;
use kubelt_protocol::swarm::{self, Behaviour, BehaviourEvent};
use kubelt_protocol::testing::store_contains;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{request_response, Multiaddr, PeerId, Swarm};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

/// A node of the test: its key and store path survive a restart.
struct TestNode {
    keypair: Keypair,
    path: PathBuf,
    port: u64,
    node: Option<Node>,
    /// Messaging limits, when not the defaults.
    msg_config: Option<kubelt_protocol::msg::Config>,
}

impl TestNode {
    async fn start(dir: &Path, name: &str, port: u64) -> anyhow::Result<TestNode> {
        let mut n = TestNode { keypair: Keypair::generate_ed25519(), path: dir.join(name), port: port - 100, node: None, msg_config: None };
        n.restart().await?;
        Ok(n)
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        // A new address each time: the memory transport may not have released the old one.
        self.port += 100;
        let config = Config {
            listen: vec![format!("/memory/{}", self.port).parse()?],
            maintenance_interval: Duration::from_millis(200),
            msg: self.msg_config.clone().unwrap_or_default(),
            ..Config::default()
        };
        self.node = Some(Node::start(self.keypair.clone(), Store::open(&self.path)?, config).await?);
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.stop().await;
        }
    }

    fn node(&self) -> &Node {
        self.node.as_ref().expect("the node runs")
    }

    fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    async fn addr(&self) -> anyhow::Result<Multiaddr> {
        Ok(self.node().client.info().await?.addresses[0].parse()?)
    }

    /// Lets this node write the wallet's core.
    async fn delegate(&self, wallet: &DevWallet) -> anyhow::Result<()> {
        let delegation = wallet.delegate(&self.peer_id(), &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
        self.node().client.cores().submit(delegation).await?;
        Ok(())
    }

    async fn connect(&self, other: &TestNode) -> anyhow::Result<()> {
        self.node().client.net().connect(other.addr().await?).await?;
        Ok(())
    }

    async fn inbox(&self, core: Address) -> anyhow::Result<Vec<InboxMessage>> {
        Ok(self.node().client.msg().inbox(core, None).await?)
    }

    /// The inbox once it holds `n` messages.
    async fn inbox_of(&self, core: Address, n: usize, what: &str) -> anyhow::Result<Vec<InboxMessage>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let inbox = self.inbox(core).await?;
            if inbox.len() >= n {
                return Ok(inbox);
            }
            anyhow::ensure!(Instant::now() < deadline, "{what}: {} of {n} messages after {WAIT:?}", inbox.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this node knows the device keys of `core` (the owner's devices published
    /// them and they reached this node).
    async fn knows_devices(&self, core: Address, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let summary = self.node().client.cores().list().await?.into_iter().find(|c| c.address == core.to_checksum());
            let devices = summary.map(|s| s.namespaces.iter().filter(|ns| ns.starts_with("_device:")).count()).unwrap_or(0);
            if devices >= n {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{n} device keys of {core} never reached the node");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_an_online_recipient_and_only_the_recipients_devices_read_it() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let sender = TestNode::start(dir.path(), "sender", port).await?;
    let device = TestNode::start(dir.path(), "device", port + 1).await?;
    let follower = TestNode::start(dir.path(), "follower", port + 2).await?;
    sender.delegate(&alice).await?;
    device.delegate(&bob).await?;
    follower.node().client.cores().follow(bob.address()).await?;
    device.connect(&sender).await?;
    follower.connect(&device).await?;
    follower.knows_devices(bob.address(), 1).await?;

    let mut events = device.node().client.events();
    let sent = sender.node().client.msg().send(alice.address(), bob.address(), b"hello bob".to_vec(), Duration::from_secs(10)).await?;
    assert!(sent.delivered, "an online recipient takes the message before send returns");
    let received = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(NodeEvent::MessageReceived { id, from, .. }) = events.recv().await {
                return (id, from);
            }
        }
    })
    .await?;
    assert_eq!(received.0.to_string(), sent.id);
    assert_eq!(received.1, alice.address());

    let inbox = device.inbox_of(bob.address(), 1, "the device").await?;
    assert_eq!(inbox[0].id, sent.id);
    assert_eq!(inbox[0].from, alice.address().to_checksum());
    assert_eq!(inbox[0].text.as_deref(), Some("hello bob"));
    // The follower hosts the inbox too, and cannot read it.
    let copy = follower.inbox_of(bob.address(), 1, "the follower").await?;
    assert_eq!(copy[0].id, sent.id);
    assert_eq!(copy[0].text, None, "a follower is not one of the recipient's devices");
    // The sender followed the recipient's core for its keys, but hosts no inbox of it.
    assert!(sender.node().client.msg().inbox(bob.address(), None).await.is_err());
    // Read and delete on the device.
    let read = device.node().client.msg().read(sent.id.parse()?).await?;
    assert!(read.read && read.text.as_deref() == Some("hello bob"));
    device.node().client.msg().delete(sent.id.parse()?).await?;
    assert!(device.inbox(bob.address()).await?.is_empty());
    // The follower's copy, offered again by inventory, does not come back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(device.inbox(bob.address()).await?.is_empty(), "a deleted message came back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_the_message_while_the_only_device_is_offline_and_the_device_reads_it_back() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let sender = TestNode::start(dir.path(), "sender", port).await?;
    let mut device = TestNode::start(dir.path(), "device", port + 1).await?;
    let mut follower = TestNode::start(dir.path(), "follower", port + 2).await?;
    sender.delegate(&alice).await?;
    device.delegate(&bob).await?;
    follower.node().client.cores().follow(bob.address()).await?;
    follower.connect(&device).await?;
    follower.knows_devices(bob.address(), 1).await?;
    device.stop().await;

    sender.connect(&follower).await?;
    let text = "meet me at the usual place; the plaintext must never be stored by the follower";
    let sent = sender.node().client.msg().send(alice.address(), bob.address(), text.as_bytes().to_vec(), Duration::from_secs(10)).await?;
    assert!(sent.delivered, "the follower takes the message for the offline device");
    let copy = follower.inbox_of(bob.address(), 1, "the follower").await?;
    assert_eq!(copy[0].text, None);

    // The follower's database holds ciphertext only: the message is on its disk (its
    // recipient's address is found there), its text is not.
    let stored = grep_dir(&follower.path, bob.address().to_lower_hex().as_bytes())?;
    assert!(!stored.is_empty(), "the follower's files do not hold the message at all");
    let leaked = grep_dir(&follower.path, text.as_bytes())?;
    assert!(leaked.is_empty(), "the plaintext is in the follower's files: {leaked:?}");
    // SST blocks are LZ4-compressed, so search every key and value as the database returns
    // them too (with the node stopped: the database is locked while it runs). The message's id
    // is a control that must be found.
    follower.stop().await;
    let id_bytes = hex::decode(&sent.id)?;
    assert!(store_contains(&follower.path, &id_bytes)?, "the follower's database does not hold the message at all");
    assert!(!store_contains(&follower.path, text.as_bytes())?, "the plaintext is in the follower's database");
    follower.restart().await?;

    // The device comes back, meets the follower, and reads the message.
    device.restart().await?;
    device.connect(&follower).await?;
    let inbox = device.inbox_of(bob.address(), 1, "the device back online").await?;
    assert_eq!(inbox[0].id, sent.id);
    assert_eq!(inbox[0].text.as_deref(), Some(text));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_survives_a_restart_and_delivers_when_a_replica_appears() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let mut sender = TestNode::start(dir.path(), "sender", port).await?;
    let mut device = TestNode::start(dir.path(), "device", port + 1).await?;
    sender.delegate(&alice).await?;
    device.delegate(&bob).await?;
    sender.connect(&device).await?;
    // The first message makes the sender follow the recipient's core for its device keys.
    let first = sender.node().client.msg().send(alice.address(), bob.address(), b"hello".to_vec(), Duration::from_secs(10)).await?;
    assert!(first.delivered);
    device.stop().await;
    let sent = sender.node().client.msg().send(alice.address(), bob.address(), b"while you were away".to_vec(), Duration::from_millis(500)).await?;
    assert!(!sent.delivered, "no replica is online");
    assert_eq!(sender.node().client.msg().outbox().await?.len(), 1);
    sender.stop().await;
    sender.restart().await?;
    assert_eq!(sender.node().client.msg().outbox().await?.len(), 1, "the outbox survives the restart");
    device.restart().await?;
    device.connect(&sender).await?;
    let inbox = device.inbox_of(bob.address(), 2, "the device").await?;
    assert_eq!(inbox[1].id, sent.id);
    assert_eq!(inbox[1].text.as_deref(), Some("while you were away"));
    let deadline = Instant::now() + WAIT;
    while !sender.node().client.msg().outbox().await?.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Files under `dir` that contain `needle`.
fn grep_dir(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(grep_dir(&path, needle)?);
        } else if std::fs::read(&path)?.windows(needle.len()).any(|w| w == needle) {
            found.push(path);
        }
    }
    Ok(found)
}

/// Sends one delivery request from the attacker's swarm and waits for the answer.
async fn deliver(attacker: &mut Swarm<Behaviour>, to: PeerId, envelopes: Vec<Envelope>) -> anyhow::Result<MsgResponse> {
    let request = MsgRequest { kind: Some(msg_request::Kind::Deliver(Deliver { envelopes })) };
    let id = attacker.behaviour_mut().msg.send_request(&to, request);
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => anyhow::bail!("no answer to the delivery request"),
            event = attacker.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Msg(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response }, ..
                })) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(BehaviourEvent::Msg(request_response::Event::OutboundFailure { request_id, error, .. })) if request_id == id => {
                    anyhow::bail!("the delivery request failed: {error}")
                }
                _ => {}
            }
        }
    }
}

fn statuses(response: &MsgResponse) -> Vec<(outcome::Status, String)> {
    response.outcomes.iter().map(|o| (o.status(), o.reason.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_revoked_misaddressed_malformed_oversized_and_flooding_messages_are_refused_and_the_node_goes_on() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let sender = TestNode::start(dir.path(), "sender", port).await?;
    let mut device = TestNode { keypair: Keypair::generate_ed25519(), path: dir.path().join("device"), port: port + 1 - 100, node: None, msg_config: None };
    device.msg_config = Some(kubelt_protocol::msg::Config::default().with_rate_per_sender(1.0, 20.0));
    device.restart().await?;
    sender.delegate(&alice).await?;
    device.delegate(&bob).await?;
    // The device also holds the sender's core: it learns revocations of alice's keys.
    device.node().client.cores().follow(alice.address()).await?;
    sender.connect(&device).await?;
    let before = sender.node().client.msg().send(alice.address(), bob.address(), b"before the attack".to_vec(), Duration::from_secs(10)).await?;
    assert!(before.delivered);

    // The attacker holds a real delegation of alice's core for its own key.
    let attacker_key = Keypair::generate_ed25519();
    let attacker_peer = attacker_key.public().to_peer_id();
    let attacker_delegation = alice.delegate(&attacker_peer, &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
    let sender_delegation = alice.delegate(&sender.peer_id(), &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
    let bob_device = kubelt_protocol::msg::DeviceKey::from_keypair(&device.keypair)?.public();
    let now = || i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let seal = |delegation: &kubelt_proto::core::OwnerStatement, to: Address, text: &[u8]| {
        envelope::seal(&attacker_key, delegation, &alice.address(), &to, text, &[bob_device], now()).map(|(_, e)| e)
    };
    let mut attacker = swarm::build(attacker_key.clone(), &swarm::Config::default(), Store::open(dir.path().join("attacker"))?)?;
    attacker.dial(device.addr().await?)?;

    let good = seal(&attacker_delegation, bob.address(), b"from a delegated key")?;
    let forged = seal(&sender_delegation, bob.address(), b"claims to be the sender node")?;
    let mut tampered = good.clone();
    let mut body = tampered.body.to_vec();
    let last = body.len() - 1;
    body[last] ^= 1;
    tampered.body = body.into();
    let not_held = seal(&attacker_delegation, DevWallet::random().address(), b"for a core nobody here holds")?;
    let garbage = vec![0xff; 100];
    let malformed = Envelope {
        signature: attacker_key.sign(&envelope::signing_bytes(&garbage))?.into(),
        body: garbage.into(),
        ..good.clone()
    };
    let oversized = Envelope { body: vec![0; envelope::MAX_BODY + 1].into(), ..good.clone() };
    let answer = deliver(&mut attacker, device.peer_id(), vec![good, forged, tampered, not_held, malformed, oversized]).await?;
    let got = statuses(&answer);
    println!("{got:?}");
    assert_eq!(got.len(), 6);
    assert_eq!(got[0].0, outcome::Status::Accepted, "a message under a valid delegation is taken: {got:?}");
    for (i, what, needle) in [(1, "forged", "delegation"), (2, "tampered", "signature"), (3, "not held", "does not hold"), (4, "malformed", "malformed"), (5, "oversized", "too large")] {
        assert_eq!(got[i].0, outcome::Status::Refused, "{what}: {got:?}");
        assert!(got[i].1.contains(needle), "{what}: {:?}", got[i].1);
    }

    // A flood from one sender core: the device takes its burst, then asks it to retry later.
    let mut flood = Vec::new();
    for i in 0..100 {
        flood.push(seal(&attacker_delegation, bob.address(), format!("flood {i}").as_bytes())?);
    }
    let mut accepted = 0;
    let mut retry = 0;
    for chunk in flood.chunks(50) {
        for (status, _) in statuses(&deliver(&mut attacker, device.peer_id(), chunk.to_vec()).await?) {
            match status {
                outcome::Status::Accepted => accepted += 1,
                outcome::Status::Retry => retry += 1,
                outcome::Status::Refused => anyhow::bail!("a valid flood message was refused for good"),
            }
        }
    }
    println!("flood of 100: {accepted} accepted, {retry} to retry later");
    assert!(accepted <= 22 && retry >= 78, "the flood was not limited: {accepted} accepted");

    // The owner revokes the attacker's key; once the device knows, its messages are refused.
    let revocation = sender.node().client.cores().revocation_message(alice.address(), attacker_peer).await?;
    sender.node().client.cores().submit(alice.statement(revocation)?).await?;
    let deadline = Instant::now() + WAIT;
    while device.node().client.cores().get(alice.address(), "_kubelt".into(), String::new()).await? == serde_json::Value::Null {
        anyhow::ensure!(Instant::now() < deadline, "the device never learned the revocation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // a token for the sender core again
    let after_revocation = seal(&attacker_delegation, bob.address(), b"after my key was revoked")?;
    let got = statuses(&deliver(&mut attacker, device.peer_id(), vec![after_revocation]).await?);
    assert_eq!(got[0].0, outcome::Status::Refused, "{got:?}");
    assert!(got[0].1.contains("revoked"), "{got:?}");

    // The device still serves: nothing it held from others is lost, the revoked key's messages
    // (the delegated one and the accepted part of the flood) are gone with its revocation, and
    // a legitimate message gets through.
    let inbox = device.inbox(bob.address()).await?;
    assert!(inbox.iter().any(|m| m.id == before.id && m.text.as_deref() == Some("before the attack")));
    assert_eq!(inbox.len(), 1, "only the first message stays: {inbox:?}");
    let after = sender.node().client.msg().send(alice.address(), bob.address(), b"after the attack".to_vec(), Duration::from_secs(10)).await?;
    assert!(after.delivered);
    device.inbox_of(bob.address(), 2, "the device after the attack").await?;
    Ok(())
}

/// A hostile peer's swarm on a task of its own that polls it all the time, so that what nodes
/// ask it (a catch-up of a core it does not hold) fails at once instead of hanging, and that
/// delivers envelopes on demand.
struct RawPeer {
    commands: tokio::sync::mpsc::Sender<RawCommand>,
    task: tokio::task::JoinHandle<()>,
}

enum RawCommand {
    Dial(Multiaddr),
    Deliver(PeerId, Vec<Envelope>, tokio::sync::oneshot::Sender<Result<MsgResponse, String>>),
}

impl RawPeer {
    fn start(mut swarm: Swarm<Behaviour>) -> RawPeer {
        let (commands, mut rx) = tokio::sync::mpsc::channel::<RawCommand>(16);
        let task = tokio::spawn(async move {
            let mut waiting = std::collections::HashMap::new();
            loop {
                tokio::select! {
                    command = rx.recv() => match command {
                        Some(RawCommand::Dial(addr)) => {
                            let _ = swarm.dial(addr);
                        }
                        Some(RawCommand::Deliver(to, envelopes, reply)) => {
                            let request = MsgRequest { kind: Some(msg_request::Kind::Deliver(Deliver { envelopes })) };
                            waiting.insert(swarm.behaviour_mut().msg.send_request(&to, request), reply);
                        }
                        None => return,
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(BehaviourEvent::Msg(request_response::Event::Message {
                            message: request_response::Message::Response { request_id, response }, ..
                        })) => {
                            if let Some(reply) = waiting.remove(&request_id) {
                                let _ = reply.send(Ok(response));
                            }
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Msg(request_response::Event::OutboundFailure { request_id, error, .. })) => {
                            if let Some(reply) = waiting.remove(&request_id) {
                                let _ = reply.send(Err(error.to_string()));
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        RawPeer { commands, task }
    }

    async fn dial(&self, addr: Multiaddr) -> anyhow::Result<()> {
        self.commands.send(RawCommand::Dial(addr)).await.map_err(|_| anyhow::anyhow!("the raw peer stopped"))
    }

    async fn deliver(&self, to: PeerId, envelopes: Vec<Envelope>) -> anyhow::Result<Vec<(outcome::Status, String)>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        // The dial may still be under way: retry a refused request for a while.
        let deadline = Instant::now() + WAIT;
        let mut reply = Some(reply);
        let mut answer = answer;
        loop {
            self.commands.send(RawCommand::Deliver(to, envelopes.clone(), reply.take().expect("one reply per try"))).await?;
            match tokio::time::timeout(WAIT, answer).await?? {
                Ok(response) => return Ok(statuses(&response)),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("delivery failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let (r, a) = tokio::sync::oneshot::channel();
                    reply = Some(r);
                    answer = a;
                }
                Err(e) => anyhow::bail!("the delivery request failed: {e}"),
            }
        }
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `check` holds on the inbox of `core` on `node`.
async fn inbox_until(node: &TestNode, core: Address, what: &str, check: impl Fn(&[InboxMessage]) -> bool) -> anyhow::Result<Vec<InboxMessage>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let inbox = node.inbox(core).await?;
        if check(&inbox) {
            return Ok(inbox);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not so after {WAIT:?}; inbox: {inbox:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node` holds a revocation of `core` (the owner statements are in `_kubelt`).
async fn knows_revocation(node: &TestNode, core: Address) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while node.node().client.cores().get(core, "_kubelt".into(), String::new()).await.unwrap_or_default() == serde_json::Value::Null {
        anyhow::ensure!(Instant::now() < deadline, "the node never learned the revocation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Same verdict whatever the order: a message signed by a key whose delegation is valid but
/// which the owner of the sender core revoked ends up in no inbox — on a replica that held the
/// sender core and learnt the revocation after the message (it is removed), one that knew the
/// revocation first (refused), and one that had never seen the sender core (it catches that
/// core up before deciding). A message of a key that was not revoked is kept by the replica
/// that caught the sender core up, without being delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_senders_message_gets_one_verdict_whether_it_arrives_before_or_after_the_sender_core_and_the_revocation() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let alice = DevWallet::random();
    // The owner's node holds alice's core (and submits the revocation). Three recipients, each
    // with one device that alone hosts its inbox, so that no inbox replication mixes the
    // orders below.
    let owner = TestNode::start(dir.path(), "owner", port).await?;
    owner.delegate(&alice).await?;
    let mut devices = Vec::new();
    let mut recipients = Vec::new();
    for i in 0..3u64 {
        let recipient = DevWallet::random();
        let device = TestNode::start(dir.path(), &format!("device{i}"), port + 1 + i).await?;
        device.delegate(&recipient).await?;
        device.connect(&owner).await?;
        devices.push(device);
        recipients.push(recipient);
    }

    // Two keys delegated by alice; `stolen` will be revoked, `kept` not.
    let (stolen, kept) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let now = || i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let seal = |key: &Keypair, to: usize, text: &[u8]| -> anyhow::Result<(String, Envelope)> {
        let delegation = alice.delegate(&key.public().to_peer_id(), &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
        let device = kubelt_protocol::msg::DeviceKey::from_keypair(&devices[to].keypair)?.public();
        let (id, envelope) = envelope::seal(key, &delegation, &alice.address(), &recipients[to].address(), text, &[device], now())?;
        Ok((id.to_string(), envelope))
    };
    let (late, first, known) = (0, 1, 2);
    let peer = RawPeer::start(swarm::build(Keypair::generate_ed25519(), &swarm::Config::default(), Store::open(dir.path().join("raw"))?)?);
    for device in &devices {
        peer.dial(device.addr().await?).await?;
    }

    // `first` holds alice's core before anything: it takes the message, then learns the
    // revocation, which removes it.
    let (bad_id, bad) = seal(&stolen, first, b"signed by a key that will be revoked")?;
    let node = &devices[first];
    node.node().client.cores().follow(alice.address()).await?;
    node.knows_devices(alice.address(), 1).await?;
    let got = peer.deliver(node.peer_id(), vec![bad.clone()]).await?;
    assert_eq!(got[0].0, outcome::Status::Accepted, "no revocation yet: {got:?}");
    inbox_until(node, recipients[first].address(), "the message on `first`", |m| m.iter().any(|m| m.id == bad_id)).await?;
    let revocation = owner.node().client.cores().revocation_message(alice.address(), stolen.public().to_peer_id()).await?;
    owner.node().client.cores().submit(alice.statement(revocation)?).await?;
    inbox_until(node, recipients[first].address(), "the revoked key's message removed on `first`", |m| m.iter().all(|m| m.id != bad_id)).await?;
    let again = peer.deliver(node.peer_id(), vec![bad]).await?;
    assert_eq!(again[0].0, outcome::Status::Refused, "offered again after the revocation: {again:?}");

    // `known` learns alice's core with its revocation first: the message is refused.
    let (bad_id_known, bad) = seal(&stolen, known, b"signed by a revoked key")?;
    let node = &devices[known];
    node.node().client.cores().follow(alice.address()).await?;
    knows_revocation(node, alice.address()).await?;
    let got = peer.deliver(node.peer_id(), vec![bad]).await?;
    assert_eq!(got[0].0, outcome::Status::Refused, "{got:?}");
    assert!(got[0].1.contains("revoked"), "{got:?}");

    // `late` never saw alice's core: both messages wait while it catches the core up, then
    // the revoked key's is refused and the other is kept, with no second delivery.
    let (bad_id_late, bad) = seal(&stolen, late, b"signed by a revoked key")?;
    let (good_id, good) = seal(&kept, late, b"signed by a key that stays")?;
    let node = &devices[late];
    let got = peer.deliver(node.peer_id(), vec![bad.clone(), good.clone()]).await?;
    assert!(got.iter().all(|(status, reason)| *status == outcome::Status::Retry && reason.contains("catching up")), "{got:?}");
    let inbox = inbox_until(node, recipients[late].address(), "the kept key's message on `late`", |m| m.iter().any(|m| m.id == good_id)).await?;
    assert!(inbox.iter().all(|m| m.id != bad_id_late), "the revoked key's message was kept: {inbox:?}");
    assert_eq!(inbox.iter().find(|m| m.id == good_id).and_then(|m| m.text.as_deref()), Some("signed by a key that stays"));
    let again = peer.deliver(node.peer_id(), vec![bad, good]).await?;
    assert_eq!(again[0].0, outcome::Status::Refused, "{again:?}");
    assert!(again[0].1.contains("revoked"), "{again:?}");
    assert_eq!(again[1].0, outcome::Status::Accepted, "{again:?}");

    // One verdict on all three: no revoked key's message in any inbox.
    for (i, bad_id) in [(first, &bad_id), (known, &bad_id_known), (late, &bad_id_late)] {
        assert!(devices[i].inbox(recipients[i].address()).await?.iter().all(|m| &m.id != bad_id));
    }
    Ok(())
}
