//! What a run does, drawn from its seed before any node starts: node keys, bootstraps, which
//! nodes hold which core, who looks up what, who leaves and how many join. The same seed and
//! parameters give the same plan, so a run's topology can be repeated; only timings (the
//! tokio scheduler, the OS) differ between two runs.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// What to simulate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Params {
    /// Nodes at the start.
    pub(crate) nodes: usize,
    /// Seed of everything drawn at random.
    pub(crate) seed: u64,
    /// Replicas of each core (capped at the nodes that are not bootstraps).
    pub(crate) replicas: usize,
    /// Cores spread over the nodes.
    pub(crate) cores: usize,
    /// Changes written before the churn, and again after it.
    pub(crate) writes: usize,
    /// DHT lookups before the churn, and again after it.
    pub(crate) lookups: usize,
    /// Bootstrap nodes (the first nodes; they never leave).
    pub(crate) bootstraps: usize,
    /// Share of the nodes that leave mid-run (as many new ones join).
    pub(crate) churn: f64,
    /// Seconds the run waits idle before it counts connections and measures memory and idle
    /// CPU: by default the swarm's idle timeout and a margin, so that the connections nobody
    /// keeps (peers met through DHT queries) have closed.
    pub(crate) settle_s: u64,
    /// Seconds between two pings of a connection (the node's default: 5).
    pub(crate) ping_s: u64,
    /// Gossipsub heartbeat in milliseconds (the node's default: 500).
    pub(crate) heartbeat_ms: u64,
    /// Seconds a connection nobody keeps stays open idle (the node's default: 30).
    pub(crate) idle_timeout_s: u64,
    /// Seconds between two Kademlia bootstraps (random walks) of a node (the node's default:
    /// 300).
    pub(crate) bootstrap_interval_s: u64,
}

/// The default of [`Params::settle_s`] for connections idle for `idle_timeout_s` to close.
pub(crate) fn default_settle_s(idle_timeout_s: u64) -> u64 {
    idle_timeout_s + 5
}

impl Default for Params {
    fn default() -> Self {
        let swarm = kubelt_protocol::swarm::Config::default();
        Params {
            nodes: 100,
            seed: 1,
            replicas: 50,
            cores: 4,
            writes: 5,
            lookups: 100,
            bootstraps: 3,
            churn: 0.1,
            settle_s: default_settle_s(swarm.idle_connection_timeout.as_secs()),
            ping_s: swarm.ping_interval.as_secs(),
            heartbeat_ms: swarm.gossip_heartbeat.as_millis() as u64,
            idle_timeout_s: swarm.idle_connection_timeout.as_secs(),
            bootstrap_interval_s: swarm.bootstrap_interval.as_secs(),
        }
    }
}

/// One core of the run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CorePlan {
    /// The owner's secp256k1 key, hex (a `DevWallet`).
    pub(crate) wallet_hex: String,
    /// The nodes holding it; the first one writes (it gets the owner's delegation), the
    /// others follow.
    pub(crate) replicas: Vec<usize>,
}

/// A lookup of a core's providers from a node that does not hold the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lookup {
    /// The node that looks.
    pub(crate) from: usize,
    /// The core it looks for.
    pub(crate) core: usize,
}

/// Everything a run draws at random (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// The parameters it was drawn for.
    pub(crate) params: Params,
    /// The ed25519 secret key of every node: the first `params.nodes` start, the rest join
    /// during the churn.
    pub(crate) keys: Vec<[u8; 32]>,
    /// The cores and their replicas.
    pub(crate) cores: Vec<CorePlan>,
    /// Lookups before the churn.
    pub(crate) lookups: Vec<Lookup>,
    /// Nodes that leave (never a bootstrap or a writer).
    pub(crate) leave: Vec<usize>,
    /// Lookups after the churn (from nodes still running, joiners included).
    pub(crate) lookups_after: Vec<Lookup>,
}

impl Plan {
    /// Draws the plan of `params`.
    pub(crate) fn new(params: &Params) -> Plan {
        let mut rng = StdRng::seed_from_u64(params.seed);
        let n = params.nodes;
        let bootstraps = params.bootstraps.clamp(1, n.max(1));
        let leaving = ((n as f64) * params.churn).round() as usize;
        let keys = (0..n + leaving).map(|_| rng.gen::<[u8; 32]>()).collect();
        let ordinary: Vec<usize> = (bootstraps..n).collect();
        let replicas = params.replicas.min(ordinary.len());
        let cores: Vec<CorePlan> = (0..params.cores)
            .map(|_| {
                // A secp256k1 secret key is any 32 bytes below the group order: a random one
                // is refused with probability ~2^-128.
                let wallet_hex = hex::encode(rng.gen::<[u8; 32]>());
                let replicas = sample(&mut rng, ordinary.len(), replicas).into_iter().map(|i| ordinary[i]).collect();
                CorePlan { wallet_hex, replicas }
            })
            .collect();
        let writers: Vec<usize> = cores.iter().filter_map(|c| c.replicas.first().copied()).collect();
        let mut may_leave: Vec<usize> = ordinary.iter().copied().filter(|i| !writers.contains(i)).collect();
        may_leave.shuffle(&mut rng);
        let mut leave: Vec<usize> = may_leave.into_iter().take(leaving).collect();
        leave.sort_unstable();
        let joined = leave.len();
        let before: Vec<usize> = (0..n).collect();
        let after: Vec<usize> = (0..n + joined).filter(|i| !leave.contains(i)).collect();
        let lookups = draw_lookups(&mut rng, &cores, &before, params.lookups);
        let lookups_after = draw_lookups(&mut rng, &cores, &after, params.lookups);
        let mut keys: Vec<[u8; 32]> = keys;
        keys.truncate(n + joined);
        Plan { params: Params { bootstraps, replicas, ..params.clone() }, keys, cores, lookups, leave, lookups_after }
    }

    /// Nodes at the start.
    pub(crate) fn nodes(&self) -> usize {
        self.params.nodes
    }

    /// Nodes that join during the churn: indices `nodes()..nodes() + joiners()`.
    pub(crate) fn joiners(&self) -> usize {
        self.keys.len() - self.params.nodes
    }

    /// Whether node `i` is a bootstrap.
    pub(crate) fn is_bootstrap(&self, i: usize) -> bool {
        i < self.params.bootstraps
    }
}

/// `count` lookups of random cores, each from a random node of `from` that does not hold the
/// core (a node holding it would find itself).
fn draw_lookups(rng: &mut StdRng, cores: &[CorePlan], from: &[usize], count: usize) -> Vec<Lookup> {
    let mut lookups = Vec::with_capacity(count);
    if cores.is_empty() {
        return lookups;
    }
    for _ in 0..count {
        let core = rng.gen_range(0..cores.len());
        let others: Vec<usize> = from.iter().copied().filter(|i| !cores[core].replicas.contains(i)).collect();
        if let Some(&node) = others.choose(rng) {
            lookups.push(Lookup { from: node, core });
        }
    }
    lookups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_topology_and_another_seed_another() {
        let params = Params { nodes: 50, replicas: 10, cores: 2, lookups: 20, ..Params::default() };
        let a = Plan::new(&params);
        assert_eq!(a, Plan::new(&params));
        let b = Plan::new(&Params { seed: params.seed + 1, ..params.clone() });
        assert_ne!(a.keys, b.keys);
        assert_ne!(a.cores, b.cores);
        assert_eq!(a.keys.len(), 55, "50 nodes and 5 joiners (10% churn)");
        assert_eq!(a.leave.len(), 5);
        for core in &a.cores {
            assert_eq!(core.replicas.len(), 10);
            assert!(core.replicas.iter().all(|&r| !a.is_bootstrap(r) && r < 50));
            assert!(!a.leave.contains(&core.replicas[0]), "a writer never leaves");
        }
        for lookup in a.lookups.iter().chain(&a.lookups_after) {
            assert!(!a.cores[lookup.core].replicas.contains(&lookup.from));
        }
        assert!(a.lookups_after.iter().all(|l| !a.leave.contains(&l.from)));
    }
}
