//! Private data benchmark (issue 14): `core set` and `core get` through the node's client on a
//! private namespace against the same on a plain namespace, in the same run, alternating
//! rounds so both see the same machine. The writer has a second device connected (two device
//! keys, changes gossiped to it), as an owner with a laptop and a phone would.
//!
//! First, the private object format (`kbobj1`) alone: seal and open 100 MiB in memory.
//!
//! `scripts/bench.sh private`, or `cargo test --release -p kubelt-protocol --bench private`
//! (env: `PRIVATE_BENCH_OPS` = 2000 writes and reads per kind).

use std::time::{Duration, Instant};

use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::node::{Config, Node};
use kubelt_protocol::store::Store;
use libp2p::identity::Keypair;
use serde_json::json;

async fn start(dir: &std::path::Path, name: &str) -> anyhow::Result<Node> {
    let config = Config { listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?], ..Config::default() };
    Ok(Node::start(Keypair::generate_ed25519(), Store::open(dir.join(name))?, config).await?)
}

/// Writes then reads `ops` values in `namespace`, `rounds` at a time; returns the time of each.
async fn round(node: &Node, core: Address, namespace: &str, start: usize, ops: usize) -> anyhow::Result<(Duration, Duration)> {
    let cores = node.client.cores();
    let t0 = Instant::now();
    for i in start..start + ops {
        cores.set(core, namespace.into(), format!("k{}", i % 100), json!({"text": format!("value {i}"), "n": i})).await?;
    }
    let set = t0.elapsed();
    let t0 = Instant::now();
    for i in start..start + ops {
        let v = cores.get(core, namespace.into(), format!("k{}", i % 100)).await?;
        anyhow::ensure!(v.is_object(), "read back {v}");
    }
    Ok((set, t0.elapsed()))
}

fn us(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

async fn run(ops: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner = DevWallet::random();
    let core = owner.address();
    let a = start(dir.path(), "a").await?;
    let b = start(dir.path(), "b").await?;
    let now = time::OffsetDateTime::now_utc();
    for node in [&a, &b] {
        node.client.cores().submit(owner.delegate(&node.peer_id, &["*"], Duration::from_secs(3600), now)?).await?;
    }
    b.client.net().connect(a.client.info().await?.addresses[0].parse()?).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.client.cores().list().await?[0].namespaces.iter().filter(|n| n.starts_with("_device:")).count() < 2 {
        anyhow::ensure!(Instant::now() < deadline, "the second device's key never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.client.cores().private(core, "secret".into()).await?;
    // Warm-up: the first private write makes the data key.
    round(&a, core, "plain", 0, 50).await?;
    round(&a, core, "secret", 0, 50).await?;
    let (mut plain, mut private) = ((Duration::ZERO, Duration::ZERO), (Duration::ZERO, Duration::ZERO));
    let per_round = 100;
    for r in 0..ops.div_ceil(per_round) {
        let p = round(&a, core, "plain", r * per_round, per_round).await?;
        let s = round(&a, core, "secret", r * per_round, per_round).await?;
        plain = (plain.0 + p.0, plain.1 + p.1);
        private = (private.0 + s.0, private.1 + s.1);
    }
    let n = ops.div_ceil(per_round) * per_round;
    println!(
        "private: set {:.0} µs/op vs plain {:.0} µs/op (private/plain {:.3}); get {:.0} µs/op vs plain {:.0} µs/op (private/plain {:.3}); {n} ops each",
        us(private.0, n),
        us(plain.0, n),
        private.0.as_secs_f64() / plain.0.as_secs_f64(),
        us(private.1, n),
        us(plain.1, n),
        private.1.as_secs_f64() / plain.1.as_secs_f64(),
    );
    a.stop().await;
    b.stop().await;
    Ok(())
}

/// The `kbobj1` format alone, in memory: MiB/s sealing and opening `mib` MiB (the ceiling of a
/// private add, whose other costs are the plain add's).
fn object_format(mib: usize) -> anyhow::Result<()> {
    use kubelt_protocol::core::private::object::{open, seal, ObjectKey};
    let data = kubelt_protocol::testing::pseudo_random(mib << 20, 7);
    let key = ObjectKey::new([1; 8], [7; 32]);
    let t0 = Instant::now();
    let sealed = seal(&key, &data)?;
    let sealing = t0.elapsed();
    let t0 = Instant::now();
    let opened = open(&sealed, |_| Ok::<_, kubelt_protocol::core::private::object::ObjectError>(key.clone()))?;
    let opening = t0.elapsed();
    anyhow::ensure!(opened == data, "round trip");
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!("private: kbobj1 format, {mib} MiB in memory: seal {:.0} MiB/s, open {:.0} MiB/s", rate(sealing), rate(opening));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    object_format(100)?;
    let ops = std::env::var("PRIVATE_BENCH_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run(ops))
}
