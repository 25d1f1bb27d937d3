//! A run: the nodes of a [`Plan`] on libp2p's memory transport, each a real
//! `kubelt_protocol::node::Node` (swarm, event loop, core logic) with an in-memory store, and
//! the measurements of the issue: DHT lookups, propagation of changes, gossip per node, churn,
//! memory and CPU.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use futures::StreamExt;
use kubelt_protocol::core::{Address, DevWallet};
use kubelt_protocol::node::{Config, Node, NodeEvent};
use kubelt_protocol::store::Store;
use kubelt_protocol::swarm;
use kubelt_protocol::sync;
use kubelt_protocol::sync::GossipCount;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{kad, Multiaddr, PeerId};
use tokio::sync::{broadcast, watch};

use crate::plan::{Lookup, Plan};
use crate::stats::{self, Cost};

/// The namespace the changes are written in.
const NAMESPACE: &str = "app";
/// How long the owner's delegation to a writer lasts.
const DELEGATION: Duration = Duration::from_secs(24 * 3600);
/// How long a change may take to reach every replica before it counts as not converged.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long gossip may still move after the last replica got a change (duplicates, IWANT
/// answers after the next heartbeats) before its messages are counted.
const GOSSIP_SETTLE: Duration = Duration::from_millis(1500);
/// Lookups in flight at once.
const LOOKUP_CONCURRENCY: usize = 8;
/// Longest wait for one lookup (Kademlia's own query timeout is 30 s).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(35);
/// Followers that follow a core at once: a wave finds the replicas of the waves before it in
/// the DHT and dials them.
const FOLLOW_WAVE: usize = 10;
/// How long the run stays idle to measure what the nodes cost doing nothing, at least: the
/// window also spans two ping intervals, so that every connection's pings fall into it.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Nodes started together (after the bootstraps), as one group of [`Sim::start_all`].
const START_CONCURRENCY: usize = 16;
/// Longest wait for a group of nodes started together to end their first bootstrap.
const START_WAVE_WAIT: Duration = Duration::from_secs(20);

/// Connections and routing tables of the running nodes (see [`Sim::tables`]).
struct Tables {
    /// Open connections per node, on average.
    connections: f64,
    /// The most open connections of one node.
    most: usize,
    /// Routing-table entries per node, on average.
    routing: f64,
    /// Connections every node opened since it started, summed.
    opened: u64,
}

/// Failed lookups, and replicas that got a change late, described on stderr per phase
/// (with where the records were, the mesh they were in), at most this many each.
const DIAGNOSE: usize = 8;
/// A replica that applied a change later than this is described on stderr.
const LATE: Duration = Duration::from_millis(500);
/// Kademlia's replication factor: a provider record is stored at the key's 20 closest nodes.
const K: usize = kad::K_VALUE.get();

/// What joining the network cost (see [`Report`]).
struct Join {
    ms: u64,
    connections_per_node: f64,
    replica_setup_ms: u64,
}

/// The idle network's connections and routing tables, and the connections opened meanwhile.
struct Idle {
    tables: Tables,
    opened_per_node_per_s: f64,
}

/// One lookup's outcome.
#[derive(Debug, Clone, Copy)]
struct LookupOutcome {
    lookup: Lookup,
    /// A provider the lookup named is a running replica of the core.
    found: bool,
    /// The query ended (or timed out) without naming any provider.
    empty: bool,
    timed_out: bool,
    hops: u32,
    requests: u32,
    successes: u32,
    elapsed: Duration,
}

/// One change's outcome.
#[derive(Debug, Clone)]
struct ChangeOutcome {
    /// Time until each other running replica applied it (those that did, in time).
    latencies: Vec<Duration>,
    /// Every running replica applied it within [`PROPAGATION_TIMEOUT`].
    converged: bool,
    /// Gossip on the core's topic received by its running replicas, summed.
    replica_gossip: GossipCount,
    /// Running replicas of the core.
    replicas: usize,
    /// Gossip on the core's topic received by the running nodes that do not hold it, summed.
    other_gossip: GossipCount,
    /// Bytes the writer published.
    published_bytes: u64,
}

/// What a phase (before or after the churn) measured.
#[derive(Debug, Default)]
struct Phase {
    lookups: Vec<LookupOutcome>,
    changes: Vec<ChangeOutcome>,
}

/// The figures of a run: its last stdout line.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Report {
    pub(crate) nodes: usize,
    pub(crate) seed: u64,
    pub(crate) replicas: usize,
    pub(crate) cores: usize,
    pub(crate) bootstraps: usize,
    /// Time to start every node and let their first Kademlia bootstrap finish.
    pub(crate) join_ms: u64,
    /// Connections each node opened (either end) until every node finished its first
    /// Kademlia bootstrap, on average.
    pub(crate) join_connections_per_node: f64,
    /// Time for the replicas of every core to find each other.
    pub(crate) replica_setup_ms: u64,
    /// Lookups over both phases.
    pub(crate) lookups: usize,
    pub(crate) lookup_success_rate: f64,
    pub(crate) lookup_hops_p50: f64,
    pub(crate) lookup_hops_p99: f64,
    pub(crate) lookup_hops_max: f64,
    pub(crate) lookup_requests_p50: f64,
    pub(crate) lookup_ms_p50: f64,
    pub(crate) lookup_ms_p99: f64,
    /// Changes written over both phases.
    pub(crate) changes: usize,
    /// Time from a write until each other replica applied it, over every change and replica.
    pub(crate) propagation_p50_ms: f64,
    pub(crate) propagation_p99_ms: f64,
    pub(crate) propagation_max_ms: f64,
    /// Every change reached every running replica of its core in time.
    pub(crate) replicas_converged: bool,
    pub(crate) changes_converged: usize,
    /// Gossip messages a replica of the written core received per change (duplicates included).
    pub(crate) gossip_messages_per_node_per_change: f64,
    /// Their bytes: what one node that holds the core carries per change.
    pub(crate) gossip_bytes_per_node_per_change: f64,
    /// The same traffic spread over every node of the network.
    pub(crate) gossip_bytes_per_network_node_per_change: f64,
    /// Bytes of one published change (the envelope).
    pub(crate) change_bytes: f64,
    /// Gossip on a core's topic received by nodes that do not hold the core (should be 0),
    /// over every change.
    pub(crate) non_replica_gossip_messages: u64,
    pub(crate) non_replica_gossip_bytes: u64,
    /// After the churn: nodes that left and joined, and what was measured then.
    pub(crate) churn_left: usize,
    pub(crate) churn_joined: usize,
    pub(crate) churn_lookup_success_rate: f64,
    pub(crate) churn_lookup_hops_p50: f64,
    pub(crate) churn_propagation_p99_ms: f64,
    pub(crate) churn_replicas_converged: bool,
    /// Open connections and Kademlia routing-table entries per node, on average, while idle
    /// (once the idle timeout closed what nobody keeps), and the most connections of a node.
    pub(crate) connections_per_node: f64,
    pub(crate) connections_max: usize,
    pub(crate) routing_table_per_node: f64,
    /// Connections opened per node per second while idle: DHT upkeep, AutoNAT probes, and
    /// peers dialed again after the idle timeout closed them (each a Noise handshake).
    pub(crate) connections_opened_per_node_per_s_idle: f64,
    /// Seconds the run waited idle before measuring connections and cost.
    pub(crate) idle_settle_s: f64,
    /// The ping interval (s), gossipsub heartbeat (ms) and idle connection timeout (s) the
    /// nodes ran with.
    pub(crate) ping_s: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) idle_timeout_s: u64,
    /// Seconds between two Kademlia bootstraps of a node.
    pub(crate) bootstrap_interval_s: u64,
    #[serde(flatten)]
    pub(crate) cost: Cost,
}

/// Nodes by plan index; `None` once stopped (or before started).
struct Sim {
    plan: Plan,
    nodes: Vec<Option<Node>>,
    peer_ids: Vec<PeerId>,
    bootstraps: Vec<Multiaddr>,
    wallets: Vec<DevWallet>,
}

/// Runs the plan and reports (see the module doc).
pub(crate) async fn run(plan: Plan) -> anyhow::Result<Report> {
    let started = Instant::now();
    let cpu_start = stats::cpu_time();
    let rss_start = stats::rss_bytes();
    let wallets = plan.cores.iter().map(|c| DevWallet::from_hex(&c.wallet_hex).context("a core's owner key")).collect::<anyhow::Result<Vec<_>>>()?;
    let peer_ids = plan.keys.iter().map(|k| Ok(keypair(k)?.public().to_peer_id())).collect::<anyhow::Result<Vec<_>>>()?;
    let mut sim = Sim { nodes: (0..plan.keys.len()).map(|_| None).collect(), plan, peer_ids, bootstraps: Vec::new(), wallets };
    let n = sim.plan.nodes();

    // Join: bootstraps first, then everyone else through them.
    let t = Instant::now();
    let all: Vec<usize> = (0..n).collect();
    sim.start_all(&all).await?;
    sim.wait_bootstrapped(&all, Duration::from_secs(120), true).await?;
    let join_ms = t.elapsed().as_millis() as u64;
    let joined = sim.tables().await?;
    let join_opened = joined.opened as f64 / n.max(1) as f64;
    eprintln!("sim: {n} nodes joined in {join_ms} ms, {join_opened:.0} connections opened per node");

    // Replicas.
    let t = Instant::now();
    sim.place_replicas().await?;
    let replica_setup_ms = t.elapsed().as_millis() as u64;
    eprintln!("sim: replicas of {} cores placed in {replica_setup_ms} ms", sim.plan.cores.len());

    // Cost while idle, with every node and replica in place and the connections nobody keeps
    // closed.
    tokio::time::sleep(Duration::from_secs(sim.plan.params.settle_s)).await;
    let rss_nodes = stats::rss_bytes();
    let opened_before = sim.tables().await?.opened;
    let cpu_idle = stats::cpu_time();
    let idle_window = IDLE_WINDOW.max(Duration::from_secs(2 * sim.plan.params.ping_s));
    tokio::time::sleep(idle_window).await;
    let idle_cpu = stats::cpu_time() - cpu_idle;
    let tables = sim.tables().await?;
    let opened_per_node_per_s = tables.opened.saturating_sub(opened_before) as f64 / n.max(1) as f64 / idle_window.as_secs_f64();
    eprintln!(
        "sim: idle: {:.1} connections per node (most {}), {opened_per_node_per_s:.2} opened per node per s, {:.1} in routing tables, RSS {} MiB",
        tables.connections,
        tables.most,
        tables.routing,
        rss_nodes >> 20
    );

    let mut before = Phase::default();
    let (cpu, t) = (stats::cpu_time(), Instant::now());
    sim.lookups("before churn", &sim.plan.lookups.clone(), &mut before).await;
    sim.writes(&mut before, 0).await?;
    eprintln!("sim: before churn: {} lookups, {} changes, CPU {:.2} s/s", before.lookups.len(), before.changes.len(), (stats::cpu_time() - cpu).as_secs_f64() / t.elapsed().as_secs_f64());

    // Churn: some leave, as many join, then everything again.
    for &i in &sim.plan.leave.clone() {
        if let Some(node) = sim.nodes[i].take() {
            node.stop().await;
        }
    }
    let joiners: Vec<usize> = (n..n + sim.plan.joiners()).collect();
    // Measured once the joiners ended their first bootstrap, as after the first join: while
    // 100 of them bootstrap at once, their queries' connections keep both cores of this one
    // machine busy, which a network of machines does not see. The departed nodes are still in
    // routing tables and provider records then.
    let t = Instant::now();
    sim.start_all(&joiners).await?;
    sim.wait_bootstrapped(&joiners, Duration::from_secs(120), true).await?;
    eprintln!("sim: {} left, {} joined in {} ms", sim.plan.leave.len(), joiners.len(), t.elapsed().as_millis());
    let mut after = Phase::default();
    let (cpu, t) = (stats::cpu_time(), Instant::now());
    sim.lookups("after churn", &sim.plan.lookups_after.clone(), &mut after).await;
    sim.writes(&mut after, sim.plan.params.writes).await?;
    eprintln!("sim: after churn: {} lookups, {} changes, CPU {:.2} s/s", after.lookups.len(), after.changes.len(), (stats::cpu_time() - cpu).as_secs_f64() / t.elapsed().as_secs_f64());

    let wall = started.elapsed();
    let cost = Cost::new(n, rss_start, rss_nodes, idle_cpu, idle_window, stats::cpu_time() - cpu_start, wall);
    let join = Join { ms: join_ms, connections_per_node: join_opened, replica_setup_ms };
    let idle = Idle { tables, opened_per_node_per_s };
    let report = sim.report(&join, &idle, &before, &after, cost);
    for node in sim.nodes.iter_mut().filter_map(Option::take) {
        node.stop().await;
    }
    Ok(report)
}

fn keypair(secret: &[u8; 32]) -> anyhow::Result<Keypair> {
    Ok(Keypair::ed25519_from_bytes(*secret)?)
}

impl Sim {
    fn node(&self, i: usize) -> Option<&Node> {
        self.nodes[i].as_ref()
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    /// Starts `nodes`: the bootstraps among them one by one (the others need their
    /// addresses), then the others [`START_CONCURRENCY`] at a time, each group once the one
    /// before it ended its first Kademlia bootstrap (or after [`START_WAVE_WAIT`]): a network
    /// grows, it does not appear at once. Started together, 1,000 nodes' bootstraps (each
    /// ~10 queries of ~20 peers, a connection each) kept both cores busy for 10 minutes, and
    /// 700 of them timed out.
    async fn start_all(&mut self, nodes: &[usize]) -> anyhow::Result<()> {
        let (bootstraps, others): (Vec<usize>, Vec<usize>) = nodes.iter().partition(|&&i| self.plan.is_bootstrap(i));
        for i in bootstraps {
            let node = self.start(i).await?;
            let info = node.client.info().await?;
            let addr = info.addresses.first().context("a bootstrap without an address")?.parse()?;
            self.bootstraps.push(addr);
            self.nodes[i] = Some(node);
        }
        for wave in others.chunks(START_CONCURRENCY) {
            let this = &*self;
            let started: Vec<(usize, anyhow::Result<Node>)> = join_all(wave.iter().map(|&i| async move { (i, this.start(i).await) })).await;
            for (i, node) in started {
                self.nodes[i] = Some(node?);
            }
            self.wait_bootstrapped(wave, START_WAVE_WAIT, false).await?;
        }
        Ok(())
    }

    /// Starts node `i`: a bootstrap listens and waits; any other node joins through the
    /// bootstraps.
    async fn start(&self, i: usize) -> anyhow::Result<Node> {
        let bootstrap = self.plan.is_bootstrap(i);
        let mut config = Config {
            listen: vec![Multiaddr::empty().with(Protocol::Memory(0))],
            bootstrap_peers: if bootstrap { Vec::new() } else { self.bootstraps.clone() },
            ..Config::default()
        };
        if bootstrap {
            config.swarm = swarm::Config::bootstrap();
        }
        config.swarm.ping_interval = Duration::from_secs(self.plan.params.ping_s.max(1));
        config.swarm.gossip_heartbeat = Duration::from_millis(self.plan.params.heartbeat_ms.max(50));
        config.swarm.idle_connection_timeout = Duration::from_secs(self.plan.params.idle_timeout_s.max(1));
        // Thousands of nodes share the process: the buffer of events nobody reads but the
        // sim's propagation waits (a few events a change) need not hold 4,096 (~800 KB).
        config.event_buffer = 256;
        config.swarm.bootstrap_interval = Duration::from_secs(self.plan.params.bootstrap_interval_s.max(1));
        // No AutoNAT: memory addresses have no IP to judge, and identify reports a new
        // observed address (an ephemeral memory port) for every connection, each of which
        // AutoNAT v2 would test with a dial-back.
        config.swarm.nat.autonat = false;
        Node::start(keypair(&self.plan.keys[i])?, Store::in_memory(), config).await.with_context(|| format!("node {i} did not start"))
    }

    /// Waits until each of `nodes` ended a Kademlia bootstrap, done or timed out (the
    /// bootstraps themselves have no one to ask at first: they count once they have peers in
    /// their table). Past `within`, says how many did not when `report`.
    async fn wait_bootstrapped(&self, nodes: &[usize], within: Duration, report: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let mut waiting = 0;
            let mut table = 0;
            for &i in nodes {
                let Some(node) = self.node(i) else { continue };
                let status = node.client.status().await?;
                table += status.routing_table_peers;
                let ended = status.bootstraps_completed + status.bootstraps_failed;
                let done = if self.plan.is_bootstrap(i) { status.routing_table_peers > 0 } else { ended > 0 };
                if !done {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                if !report {
                    return Ok(());
                }
                // Measured anyway: what lookups and propagation do then is the finding.
                eprintln!(
                    "sim: {waiting} of {} nodes did not finish a DHT bootstrap within {within:?} (routing tables hold {:.1} peers on average)",
                    nodes.len(),
                    table as f64 / nodes.len().max(1) as f64
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn address(&self, core: usize) -> Address {
        self.wallets[core].address()
    }

    /// Open connections and routing-table entries per running node, on average, the most
    /// connections of one node, and the connections every node opened so far.
    async fn tables(&self) -> anyhow::Result<Tables> {
        let (mut connections, mut most, mut routing, mut opened, mut nodes) = (0, 0, 0, 0, 0u32);
        for (_, node) in self.running() {
            let status = node.client.status().await?;
            connections += status.connected_peers;
            most = most.max(status.connected_peers);
            routing += status.routing_table_peers;
            opened += status.connections_established;
            nodes += 1;
        }
        let nodes = f64::from(nodes.max(1));
        Ok(Tables { connections: connections as f64 / nodes, most, routing: routing as f64 / nodes, opened })
    }

    /// The running replicas of a core.
    fn live_replicas(&self, core: usize) -> Vec<usize> {
        self.plan.cores[core].replicas.iter().copied().filter(|&r| self.node(r).is_some()).collect()
    }

    /// Gives each core's writer the owner's delegation, then lets the followers follow in
    /// waves, and waits until every replica sees another one.
    async fn place_replicas(&self) -> anyhow::Result<()> {
        for (c, core) in self.plan.cores.iter().enumerate() {
            let Some(&writer) = core.replicas.first() else { continue };
            let statement = self.wallets[c].delegate(&self.peer_ids[writer], &["*"], DELEGATION, time::OffsetDateTime::now_utc())?;
            self.node(writer).context("writer stopped")?.client.cores().submit(statement).await?;
        }
        let longest = self.plan.cores.iter().map(|c| c.replicas.len()).max().unwrap_or(0);
        let mut rank = 1;
        while rank < longest {
            for (c, core) in self.plan.cores.iter().enumerate() {
                for &r in core.replicas.iter().skip(rank).take(FOLLOW_WAVE) {
                    self.node(r).context("replica stopped")?.client.cores().follow(self.address(c)).await?;
                }
            }
            rank += FOLLOW_WAVE;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut alone = 0;
            for (c, core) in self.plan.cores.iter().enumerate() {
                if core.replicas.len() < 2 {
                    continue;
                }
                for &r in &core.replicas {
                    let summary = self.node(r).context("replica stopped")?.client.cores().summary(self.address(c)).await?;
                    if summary.replicas == 0 {
                        alone += 1;
                    }
                }
            }
            if alone == 0 {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("sim: {alone} replicas still see no other replica; measuring anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Gossipsub grafts its meshes on its heartbeat (500 ms).
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    }

    /// Runs lookups, [`LOOKUP_CONCURRENCY`] at a time, and describes the failed ones.
    async fn lookups(&self, name: &str, lookups: &[Lookup], phase: &mut Phase) {
        let outcomes = futures::stream::iter(lookups.iter().map(|l| self.lookup(*l))).buffer_unordered(LOOKUP_CONCURRENCY).collect::<Vec<_>>().await;
        self.diagnose_lookups(name, &outcomes).await;
        phase.lookups.extend(outcomes);
    }

    async fn lookup(&self, lookup: Lookup) -> LookupOutcome {
        let failed = LookupOutcome { lookup, found: false, empty: true, timed_out: true, hops: 0, requests: 0, successes: 0, elapsed: LOOKUP_TIMEOUT };
        let Some(node) = self.node(lookup.from) else { return failed };
        let key = self.address(lookup.core).dht_key().to_vec();
        let live: HashSet<PeerId> = self.live_replicas(lookup.core).into_iter().map(|r| self.peer_ids[r]).collect();
        match tokio::time::timeout(LOOKUP_TIMEOUT, node.client.net().find_providers(key)).await {
            Ok(Ok(found)) => LookupOutcome {
                lookup,
                found: found.providers.iter().any(|p| live.contains(p)),
                empty: found.providers.is_empty(),
                timed_out: false,
                hops: found.hops,
                requests: found.requests,
                successes: found.successes,
                elapsed: found.elapsed,
            },
            _ => failed,
        }
    }

    /// Says on stderr why the first failed lookups of a phase failed: how the query ended,
    /// and where the core's provider records are, by rank of closeness to the key among the
    /// running nodes (Kademlia stores them at the closest [`K`] and a query converges there).
    async fn diagnose_lookups(&self, phase: &str, outcomes: &[LookupOutcome]) {
        for outcome in outcomes.iter().filter(|l| !l.found).take(DIAGNOSE) {
            let lookup = outcome.lookup;
            let key = self.address(lookup.core).dht_key().to_vec();
            let target = kad::KBucketKey::new(kad::RecordKey::new(&key));
            let mut ranked: Vec<(usize, &Node)> = self.running().collect();
            ranked.sort_by_key(|(i, _)| target.distance(&kad::KBucketKey::from(self.peer_ids[*i])));
            let mut holders = Vec::new();
            for (rank, (_, node)) in ranked.iter().enumerate() {
                if node.client.net().stored_providers(key.clone()).await.map(|p| !p.is_empty()).unwrap_or(false) {
                    holders.push(rank);
                }
            }
            let closest_known = match self.node(lookup.from) {
                Some(node) => {
                    let table: HashSet<String> = node.client.net().routing_table().await.map(|t| t.into_iter().map(|p| p.peer_id).collect()).unwrap_or_default();
                    ranked.iter().position(|(i, _)| table.contains(&self.peer_ids[*i].to_base58())).map_or("none".to_string(), |r| r.to_string())
                }
                None => "stopped".to_string(),
            };
            let how = if outcome.timed_out {
                "timed out".to_string()
            } else if outcome.empty {
                format!("ended without providers after {} requests ({} answered)", outcome.requests, outcome.successes)
            } else {
                "named only providers that left".to_string()
            };
            let in_k = holders.iter().filter(|&&r| r < K).count();
            eprintln!(
                "sim: {phase}: lookup of core {} from node {} {how}; {} nodes hold its records, {in_k} of them among the {K} closest (ranks {:?}); the querier's closest routing-table entry has rank {closest_known}",
                lookup.core,
                lookup.from,
                holders.len(),
                &holders[..holders.len().min(30)],
            );
        }
    }

    /// Writes `params.writes` changes, one at a time, cycling over the cores; `first` is the
    /// number of the first (each change sets its own key).
    async fn writes(&self, phase: &mut Phase, first: usize) -> anyhow::Result<()> {
        if self.plan.cores.is_empty() {
            return Ok(());
        }
        for seq in first..first + self.plan.params.writes {
            let outcome = self.write(seq % self.plan.cores.len(), seq).await?;
            phase.changes.push(outcome);
        }
        Ok(())
    }

    /// Writes one change on the core's writer and follows it to every running replica; counts
    /// the gossip on the core's topic every running node received meanwhile.
    async fn write(&self, core: usize, seq: usize) -> anyhow::Result<ChangeOutcome> {
        let address = self.address(core);
        let topic = sync::topic(&address).hash();
        let replicas = self.live_replicas(core);
        let writer = replicas.first().copied().context("the writer stopped")?;
        let gossip_before: Vec<(usize, GossipCount)> = self.running().map(|(i, n)| (i, n.gossip_on(&topic))).collect();
        // Each replica's gossipsub mesh of the core and the replicas it knows, to describe
        // the late ones.
        let mut meshes = Vec::with_capacity(replicas.len());
        for &r in &replicas {
            let summary = self.node(r).context("a replica stopped")?.client.cores().summary(address).await?;
            meshes.push((summary.mesh, summary.replicas));
        }
        let (target_tx, target) = watch::channel(None::<String>);
        let start = Instant::now();
        let waiters: Vec<_> = replicas[1..]
            .iter()
            .map(|&r| {
                let events = self.node(r).map(|n| n.client.events());
                let target = target.clone();
                tokio::spawn(async move {
                    match events {
                        Some(events) => applied_at(events, address, target, start, PROPAGATION_TIMEOUT).await,
                        None => None,
                    }
                })
            })
            .collect();
        let value = serde_json::json!({ "seq": seq, "padding": "x".repeat(64) });
        let writer_node = self.node(writer).context("the writer stopped")?;
        let summary = writer_node.client.cores().set(address, NAMESPACE.into(), format!("k{seq}"), value).await?;
        let head = summary.heads.first().cloned().context("a write left no head")?;
        let _ = target_tx.send(Some(head));
        let latencies: Vec<Option<Duration>> = join_all(waiters).await.into_iter().map(|r| r.ok().flatten()).collect();
        let converged = latencies.iter().all(Option::is_some);
        self.diagnose_late(seq, &replicas, &meshes, &latencies);
        tokio::time::sleep(GOSSIP_SETTLE).await;
        let mut replica_gossip = GossipCount::default();
        let mut other_gossip = GossipCount::default();
        let mut published_bytes = 0;
        for (i, before) in gossip_before {
            let Some(node) = self.node(i) else { continue };
            let delta = node.gossip_on(&topic).since(&before);
            if i == writer {
                published_bytes = delta.published_bytes;
            }
            let sum = if replicas.contains(&i) { &mut replica_gossip } else { &mut other_gossip };
            sum.received += delta.received;
            sum.received_bytes += delta.received_bytes;
            sum.published += delta.published;
            sum.published_bytes += delta.published_bytes;
        }
        Ok(ChangeOutcome { latencies: latencies.into_iter().flatten().collect(), converged, replica_gossip, replicas: replicas.len(), other_gossip, published_bytes })
    }

    /// Says on stderr which replicas got change `seq` late (or not at all), and what their
    /// gossipsub mesh of the core held then, next to the mesh of those that got it in time.
    fn diagnose_late(&self, seq: usize, replicas: &[usize], meshes: &[(usize, usize)], latencies: &[Option<Duration>]) {
        let late: Vec<usize> = (0..latencies.len()).filter(|&i| latencies[i].is_none_or(|d| d > LATE)).collect();
        if late.is_empty() {
            return;
        }
        let in_time: Vec<f64> = (0..latencies.len()).filter(|i| !late.contains(i)).map(|i| meshes[i + 1].0 as f64).collect();
        let described: Vec<String> = late
            .iter()
            .take(DIAGNOSE)
            .map(|&i| {
                let (mesh, known) = meshes[i + 1];
                let when = latencies[i].map_or("never".to_string(), |d| format!("{:.0} ms", ms(d)));
                format!("node {} {when} (mesh {mesh}, {known} replicas known)", replicas[i + 1])
            })
            .collect();
        eprintln!(
            "sim: change {seq}: {} of {} replicas later than {LATE:?}: {}; the writer's mesh {}, in-time replicas' mesh p50 {:.0} (min {:.0})",
            late.len(),
            latencies.len(),
            described.join(", "),
            meshes[0].0,
            stats::percentile(&in_time, 50.0),
            stats::percentile(&in_time, 0.0),
        );
    }

    fn report(&self, join: &Join, idle: &Idle, before: &Phase, after: &Phase, cost: Cost) -> Report {
        let lookups: Vec<&LookupOutcome> = before.lookups.iter().chain(&after.lookups).collect();
        let changes: Vec<&ChangeOutcome> = before.changes.iter().chain(&after.changes).collect();
        let found: Vec<&&LookupOutcome> = lookups.iter().filter(|l| l.found).collect();
        let hops: Vec<f64> = found.iter().map(|l| l.hops as f64).collect();
        let requests: Vec<f64> = found.iter().map(|l| l.requests as f64).collect();
        let lookup_ms: Vec<f64> = found.iter().map(|l| ms(l.elapsed)).collect();
        let latencies: Vec<f64> = changes.iter().flat_map(|c| c.latencies.iter().map(|d| ms(*d))).collect();
        let per_change = |f: &dyn Fn(&ChangeOutcome) -> f64| if changes.is_empty() { 0.0 } else { changes.iter().map(|c| f(c)).sum::<f64>() / changes.len() as f64 };
        let network = self.running().count().max(1) as f64;
        let after_found: Vec<f64> = after.lookups.iter().filter(|l| l.found).map(|l| l.hops as f64).collect();
        let after_latencies: Vec<f64> = after.changes.iter().flat_map(|c| c.latencies.iter().map(|d| ms(*d))).collect();
        Report {
            nodes: self.plan.nodes(),
            seed: self.plan.params.seed,
            replicas: self.plan.params.replicas,
            cores: self.plan.cores.len(),
            bootstraps: self.plan.params.bootstraps,
            join_ms: join.ms,
            join_connections_per_node: join.connections_per_node,
            replica_setup_ms: join.replica_setup_ms,
            lookups: lookups.len(),
            lookup_success_rate: rate(found.len(), lookups.len()),
            lookup_hops_p50: stats::percentile(&hops, 50.0),
            lookup_hops_p99: stats::percentile(&hops, 99.0),
            lookup_hops_max: stats::percentile(&hops, 100.0),
            lookup_requests_p50: stats::percentile(&requests, 50.0),
            lookup_ms_p50: stats::percentile(&lookup_ms, 50.0),
            lookup_ms_p99: stats::percentile(&lookup_ms, 99.0),
            changes: changes.len(),
            propagation_p50_ms: stats::percentile(&latencies, 50.0),
            propagation_p99_ms: stats::percentile(&latencies, 99.0),
            propagation_max_ms: stats::percentile(&latencies, 100.0),
            replicas_converged: !changes.is_empty() && changes.iter().all(|c| c.converged),
            changes_converged: changes.iter().filter(|c| c.converged).count(),
            gossip_messages_per_node_per_change: per_change(&|c| c.replica_gossip.received as f64 / c.replicas.max(1) as f64),
            gossip_bytes_per_node_per_change: per_change(&|c| c.replica_gossip.received_bytes as f64 / c.replicas.max(1) as f64),
            gossip_bytes_per_network_node_per_change: per_change(&|c| (c.replica_gossip.received_bytes + c.other_gossip.received_bytes) as f64 / network),
            change_bytes: per_change(&|c| c.published_bytes as f64),
            non_replica_gossip_messages: changes.iter().map(|c| c.other_gossip.received).sum(),
            non_replica_gossip_bytes: changes.iter().map(|c| c.other_gossip.received_bytes).sum(),
            churn_left: self.plan.leave.len(),
            churn_joined: self.plan.joiners(),
            churn_lookup_success_rate: rate(after.lookups.iter().filter(|l| l.found).count(), after.lookups.len()),
            churn_lookup_hops_p50: stats::percentile(&after_found, 50.0),
            churn_propagation_p99_ms: stats::percentile(&after_latencies, 99.0),
            churn_replicas_converged: !after.changes.is_empty() && after.changes.iter().all(|c| c.converged),
            connections_per_node: idle.tables.connections,
            connections_max: idle.tables.most,
            routing_table_per_node: idle.tables.routing,
            connections_opened_per_node_per_s_idle: idle.opened_per_node_per_s,
            idle_settle_s: self.plan.params.settle_s as f64,
            ping_s: self.plan.params.ping_s,
            heartbeat_ms: self.plan.params.heartbeat_ms,
            idle_timeout_s: self.plan.params.idle_timeout_s,
            bootstrap_interval_s: self.plan.params.bootstrap_interval_s,
            cost,
        }
    }
}

/// When a node's events show that it applied the change `target` names (known once the
/// write returns; events before that are kept).
async fn applied_at(mut events: broadcast::Receiver<NodeEvent>, core: Address, mut target: watch::Receiver<Option<String>>, start: Instant, within: Duration) -> Option<Duration> {
    let deadline = tokio::time::Instant::from_std(start + within);
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let mut writer_done = false;
    loop {
        if let Some(head) = target.borrow().as_ref() {
            if let Some((_, at)) = seen.iter().find(|(h, _)| h == head) {
                return Some(*at);
            }
        }
        tokio::select! {
            event = events.recv() => match event {
                Ok(NodeEvent::CoreUpdated(update)) if update.core == core => {
                    let at = start.elapsed();
                    seen.extend(update.applied.into_iter().map(|h| (h, at)));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            changed = target.changed(), if !writer_done => if changed.is_err() {
                // The write failed (or returned): what `target` holds now is final.
                writer_done = true;
                if target.borrow().is_none() {
                    return None;
                }
            },
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rate(part: usize, all: usize) -> f64 {
    if all == 0 {
        0.0
    } else {
        part as f64 / all as f64
    }
}
