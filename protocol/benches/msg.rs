//! Messaging benchmark (issue 13): delivery latency p50/p99 between two online nodes over
//! loopback (from the sender's `send` call to the recipient's "message received" event), and
//! messages per second from one sender to one recipient (many sends in flight, until the
//! recipient has stored them all). Both nodes run in this process on TCP 127.0.0.1, so they
//! share the machine's cores. The recipient's per-sender rate limit is lifted: it is a defence
//! against floods, not what is measured.
//!
//! `scripts/bench.sh msg`, or `cargo test --release -p kubelt-protocol --bench msg`
//! (env: `MSG_BENCH_LATENCY` = 1000 messages, `MSG_BENCH_THROUGHPUT` = 10000, `MSG_BENCH_INFLIGHT` = 64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kubelt_protocol::core::DevWallet;
use kubelt_protocol::node::{Config, Node, NodeEvent};
use kubelt_protocol::store::Store;
use libp2p::identity::Keypair;
use tokio::sync::Semaphore;

async fn start(dir: &std::path::Path, name: &str) -> anyhow::Result<Node> {
    let msg = kubelt_protocol::msg::Config::default().with_rate_per_sender(1e9, 1e9).with_max_per_sender(1_000_000).with_max_messages(1_000_000);
    let config = Config { listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?], msg, ..Config::default() };
    Ok(Node::start(Keypair::generate_ed25519(), Store::open(dir.join(name))?, config).await?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn run(latency_count: usize, throughput_count: usize, in_flight: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (alice, bob) = (DevWallet::random(), DevWallet::random());
    let sender = start(dir.path(), "sender").await?;
    let recipient = start(dir.path(), "recipient").await?;
    let now = time::OffsetDateTime::now_utc();
    sender.client.cores().submit(alice.delegate(&sender.peer_id, &["*"], Duration::from_secs(3600), now)?).await?;
    recipient.client.cores().submit(bob.delegate(&recipient.peer_id, &["*"], Duration::from_secs(3600), now)?).await?;
    sender.client.net().connect(recipient.client.info().await?.addresses[0].parse()?).await?;
    // The first message makes the sender learn the recipient's device key.
    let first = sender.client.msg().send(alice.address(), bob.address(), b"hello".to_vec(), Duration::from_secs(30)).await?;
    anyhow::ensure!(first.delivered, "the first message was not delivered");

    let mut events = recipient.client.events();
    let mut latencies = Vec::with_capacity(latency_count);
    for i in 0..latency_count {
        let t0 = Instant::now();
        let sent = sender.client.msg().send(alice.address(), bob.address(), format!("latency {i}").into_bytes(), Duration::ZERO).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), events.recv()).await.context("no message received in 30 s")? {
                Ok(NodeEvent::MessageReceived { id, .. }) if id.to_string() == sent.id => break,
                _ => {}
            }
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    println!(
        "delivery latency over {latency_count} messages, send call to stored at the recipient: p50 {}, p99 {}, max {} (goal p99 < 20 ms)",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().context("no samples")?)
    );

    let permits = Arc::new(Semaphore::new(in_flight));
    let t0 = Instant::now();
    let (from, to) = (alice.address(), bob.address());
    let counter = tokio::spawn(async move {
        let mut received = 0;
        while received < throughput_count {
            match events.recv().await {
                Ok(NodeEvent::MessageReceived { .. }) => received += 1,
                Ok(_) => {}
                Err(e) => anyhow::bail!("event stream: {e}"),
            }
        }
        Ok(t0.elapsed())
    });
    for i in 0..throughput_count {
        let permit = permits.clone().acquire_owned().await?;
        let client = sender.client.clone();
        tokio::spawn(async move {
            let _ = client.msg().send(from, to, format!("throughput {i}").into_bytes(), Duration::ZERO).await;
            drop(permit);
        });
    }
    let elapsed = tokio::time::timeout(Duration::from_secs(300), counter).await.context("throughput run took over 300 s")???;
    println!(
        "throughput: {throughput_count} messages one sender -> one recipient in {:.2} s: {:.0} messages/s ({in_flight} sends in flight; goal >= 2,000/s)",
        elapsed.as_secs_f64(),
        throughput_count as f64 / elapsed.as_secs_f64()
    );
    sender.stop().await;
    recipient.stop().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    }
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(env("MSG_BENCH_LATENCY", 1000), env("MSG_BENCH_THROUGHPUT", 10_000), env("MSG_BENCH_INFLIGHT", 64)))
}
