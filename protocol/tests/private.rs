//! Private namespaces between real nodes in this process (memory transport): the owner's two
//! devices read each other's private writes, a follower replicates and verifies the same
//! document without reading it (and holds no plaintext on disk), a hosting node given the
//! wallet's signature reads it, and a revoked device reads old values but not new ones.

mod common;

use common::{base_port, init_tracing};

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubelt_protocol::core::private::unlock_message;
use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::node::{Config, CoreCommandError, Node};
use kubelt_protocol::store::Store;
use kubelt_protocol::testing::store_contains;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    keypair: Keypair,
    path: PathBuf,
    node: Option<Node>,
}

impl TestNode {
    async fn start(dir: &Path, name: &str, port: u64) -> anyhow::Result<TestNode> {
        let keypair = Keypair::generate_ed25519();
        let path = dir.join(name);
        let config = Config { listen: vec![format!("/memory/{port}").parse()?], maintenance_interval: Duration::from_millis(200), ..Config::default() };
        let node = Node::start(keypair.clone(), Store::open(&path)?, config).await?;
        Ok(TestNode { keypair, path, node: Some(node) })
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

    async fn delegate(&self, wallet: &DevWallet) -> anyhow::Result<()> {
        let delegation = wallet.delegate(&self.peer_id(), &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
        self.node().client.cores().submit(delegation).await?;
        Ok(())
    }

    async fn connect(&self, other: &TestNode) -> anyhow::Result<()> {
        self.node().client.net().connect(other.addr().await?).await?;
        Ok(())
    }

    async fn get(&self, core: Address, namespace: &str, path: &str) -> Result<Value, CoreCommandError> {
        self.node().client.cores().get(core, namespace.into(), path.into()).await
    }

    /// Waits until `namespace/path` reads `expected` here.
    async fn reads(&self, core: Address, namespace: &str, path: &str, expected: &Value) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.get(core, namespace, path).await;
            if got.as_ref().ok() == Some(expected) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{namespace}/{path} never read {expected} (last: {got:?})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this node holds `namespace/path` (raw, encrypted or not).
    async fn holds(&self, core: Address, namespace: &str, path: &str) -> anyhow::Result<CoreCommandError> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.get(core, namespace, path).await {
                Err(e @ CoreCommandError::Encrypted(_)) => return Ok(e),
                other => anyhow::ensure!(Instant::now() < deadline, "{namespace}/{path} never arrived encrypted (last: {other:?})"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn heads(&self, core: Address) -> anyhow::Result<Vec<String>> {
        let list = self.node().client.cores().list().await?;
        Ok(list.into_iter().find(|c| c.address == core.to_checksum()).map(|c| c.heads).unwrap_or_default())
    }

    async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.stop().await;
        }
    }
}

/// Whether any file under `dir` contains `needle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_values_are_read_by_devices_and_unlocked_nodes_only_and_rotate_after_a_revocation() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let port = base_port();
    let owner = DevWallet::random();
    let core = owner.address();
    let a = TestNode::start(dir.path(), "a", port).await?;
    let b = TestNode::start(dir.path(), "b", port + 1).await?;
    let mut follower = TestNode::start(dir.path(), "follower", port + 2).await?;
    let host = TestNode::start(dir.path(), "host", port + 3).await?;
    a.delegate(&owner).await?;
    b.delegate(&owner).await?;
    follower.node().client.cores().follow(core).await?;
    host.node().client.cores().follow(core).await?;
    for other in [&b, &follower, &host] {
        other.connect(&a).await?;
    }
    b.connect(&follower).await?;

    // A declares the namespace private once B's device key is known to A.
    a.node().client.cores().set(core, "profile".into(), "name".into(), json!("plain-control-value")).await?;
    b.reads(core, "profile", "name", &json!("plain-control-value")).await?;
    let deadline = Instant::now() + WAIT;
    while a.node().client.cores().list().await?[0].namespaces.iter().filter(|n| n.starts_with("_device:")).count() < 2 {
        anyhow::ensure!(Instant::now() < deadline, "B's device key never reached A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.node().client.cores().private(core, "notes".into()).await?;
    a.node().client.cores().set(core, "notes".into(), "diary".into(), json!("secret-value-from-a")).await?;
    b.reads(core, "notes", "diary", &json!("secret-value-from-a")).await?;
    b.node().client.cores().set(core, "notes".into(), "todo".into(), json!({"item": "secret-value-from-b"})).await?;
    a.reads(core, "notes", "todo/item", &json!("secret-value-from-b")).await?;

    // The follower holds and verifies the same document but reads "encrypted".
    let error = follower.holds(core, "notes", "todo").await?;
    assert!(error.to_string().starts_with("encrypted"), "{error}");
    follower.reads(core, "profile", "name", &json!("plain-control-value")).await?;
    let deadline = Instant::now() + WAIT;
    while follower.heads(core).await? != a.heads(core).await? {
        anyhow::ensure!(Instant::now() < deadline, "the follower never converged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The owner unlocks A (so data keys get wrapped to the wallet key too), then gives the
    // hosting node the same signature, made outside any node.
    let signature = owner.sign(&unlock_message(&core))?;
    a.node().client.cores().unlock(core, signature.clone()).await?;
    let wrong = DevWallet::random().sign(&unlock_message(&core))?;
    assert!(matches!(host.node().client.cores().unlock(core, wrong).await, Err(CoreCommandError::InvalidInput(_))));
    let deadline = Instant::now() + WAIT;
    loop {
        // The unlock takes effect once A's wraps to the wallet key reached the host.
        let outcome = host.node().client.cores().unlock(core, signature.clone()).await?;
        if outcome.keys > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the wallet key never opened a data key on the host");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.reads(core, "notes", "diary", &json!("secret-value-from-a")).await?;
    host.reads(core, "notes", "todo", &json!({"item": "secret-value-from-b"})).await?;

    // Revoke B: A's next write uses a new key B cannot read; B still reads the old values.
    let message = a.node().client.cores().revocation_message(core, b.peer_id()).await?;
    a.node().client.cores().submit(owner.statement(message)?).await?;
    a.node().client.cores().set(core, "notes".into(), "after".into(), json!("secret-after-revocation")).await?;
    host.reads(core, "notes", "after", &json!("secret-after-revocation")).await?;
    let error = b.holds(core, "notes", "after").await?;
    assert!(matches!(error, CoreCommandError::Encrypted(_)));
    assert_eq!(b.get(core, "notes", "diary").await?, json!("secret-value-from-a"));

    // No plaintext of a private value anywhere in the follower's database; the plain
    // value is there (the grep works).
    let path = follower.path.clone();
    follower.stop().await;
    assert!(store_contains(&path, b"plain-control-value")?, "the search finds plain values");
    assert!(!store_contains(&path, b"secret-value-from")?, "plaintext in the follower's database");
    assert!(!store_contains(&path, b"secret-after-revocation")?, "plaintext in the follower's database");
    Ok(())
}
