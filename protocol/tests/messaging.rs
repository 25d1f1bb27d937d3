//! Messages between cores, with real nodes in this process on the memory transport: delivery
//! to an online recipient, to a follower while the recipient's only device is offline, the
//! outbox across a restart, and a hostile peer's envelopes (forged, revoked, for a core not
//! held, malformed, oversized, a flood), each refused while the node keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use kubelt_proto::msg::{msg_request, outcome, Deliver, Envelope, MsgRequest, MsgResponse};
use kubelt_proto::Message;
use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::msg::envelope;
use kubelt_protocol::node::{Config, InboxMessage, Node, NodeEvent};
use kubelt_protocol::store::Store;
use kubelt_protocol::swarm::{self, Behaviour, BehaviourEvent};
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
}

impl TestNode {
    async fn start(dir: &Path, name: &str, port: u64) -> anyhow::Result<TestNode> {
        let mut n = TestNode { keypair: Keypair::generate_ed25519(), path: dir.join(name), port: port - 100, node: None };
        n.restart().await?;
        Ok(n)
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        // A new address each time: the memory transport may not have released the old one.
        self.port += 100;
        let config = Config {
            listen: vec![format!("/memory/{}", self.port).parse()?],
            maintenance_interval: Duration::from_millis(200),
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

fn base_port() -> u64 {
    rand::random::<u32>() as u64 * 1000 + 1
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
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
    let follower = TestNode::start(dir.path(), "follower", port + 2).await?;
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
