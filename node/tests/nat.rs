//! Nodes behind real NATs: Linux routers in network namespaces doing nftables masquerading
//! (see `common/netns.rs` for the topology and why no named namespace is used), a public
//! bootstrap node that is also the relay, and `kubelt` processes at home.
//!
//! Needs root and `nft` (`scripts/setup.sh --test` installs nftables); without them each test
//! fails saying so, or skips loudly with KUBELT_SKIP_NAT=1.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{NsNode, Nat, Topology, PUBLIC_IP};
use common::{skip_or_fail, wait_until};
use serde_json::Value;

/// With KUBELT_KEEP_TEST_DIR=1 the repos and logs stay for a look after the test.
fn keep_if_asked(dir: tempfile::TempDir) -> Dir {
    if std::env::var("KUBELT_KEEP_TEST_DIR").is_ok_and(|v| v == "1") {
        let path = dir.keep();
        eprintln!("keeping {}", path.display());
        Dir::Kept(path)
    } else {
        Dir::Temp(dir)
    }
}

enum Dir {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

/// The test's directory, if it can run; `Ok(None)`: skipped on purpose.
fn test_dir(test: &str) -> anyhow::Result<Option<Dir>> {
    match common::netns::unavailable() {
        None => Ok(Some(keep_if_asked(tempfile::tempdir()?))),
        Some(reason) => {
            skip_or_fail("KUBELT_SKIP_NAT", test, &reason, "Run as root with nftables installed (scripts/setup.sh --test)")?;
            Ok(None)
        }
    }
}

fn field(node: &NsNode, name: &str) -> anyhow::Result<Value> {
    Ok(node.status()?[name].clone())
}

/// Waits until `node`'s status field `name` is `value`.
fn wait_status(node: &NsNode, name: &str, value: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_until(&format!("{} to have {name} = {value}", node.name), timeout, || Ok(field(node, name)? == value))
        .map_err(|e| anyhow::anyhow!("{e}\nstatus: {:?}\nlog of {}:\n{}", node.status().ok(), node.name, node.log_tail(60)))
}

/// Waits until `node` holds a relay reservation; returns its `/p2p-circuit` address.
fn wait_relay_address(node: &NsNode, timeout: Duration) -> anyhow::Result<String> {
    let mut found = String::new();
    wait_until(&format!("{} to hold a relay reservation", node.name), timeout, || {
        let status = node.status()?;
        match status["relay_addresses"].as_array().and_then(|a| a.first()).and_then(Value::as_str) {
            Some(addr) => {
                found = addr.to_string();
                Ok(true)
            }
            None => Ok(false),
        }
    })
    .map_err(|e| anyhow::anyhow!("{e}\nlog of {}:\n{}", node.name, node.log_tail(60)))?;
    Ok(found)
}

/// The bootstrap/relay node on the public host.
fn start_bootstrap(topology: &Topology, dir: &Path, edits: &[(&str, &str)]) -> anyhow::Result<NsNode> {
    NsNode::start(&topology.internet, dir, "bootstrap", edits, &["--bootstrap"])
}

/// A node on host `i` of home `h`, joining through the bootstrap.
fn start_home(topology: &Topology, dir: &Path, h: usize, i: usize, boot: &NsNode) -> anyhow::Result<NsNode> {
    start_home_with(topology, dir, h, i, boot, &[])
}

fn start_home_with(topology: &Topology, dir: &Path, h: usize, i: usize, boot: &NsNode, edits: &[(&str, &str)]) -> anyhow::Result<NsNode> {
    NsNode::start(&topology.homes[h].hosts[i], dir, &format!("home{h}-{i}"), edits, &["--peer", &boot.addr(PUBLIC_IP)])
}

/// A wallet key made with the CLI (no node needed) and its address.
fn wallet(dir: &Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    let key = dir.join("owner.key");
    let address = common::kubelt_ok(dir, &["core", "dev-wallet", "--create", key.to_str().unwrap_or_default()])?;
    Ok((key, address))
}

/// Makes `node` a writer of `address` (delegation signed with the wallet at `key`).
fn delegate(node: &NsNode, address: &str, key: &Path) -> anyhow::Result<()> {
    let message = node.cli_ok(&["core", "delegate", address, "--expires", "1d"])?;
    let file = node.repo.join("delegation.siwe");
    std::fs::write(&file, message)?;
    node.cli_ok(&["core", "submit", "--message-file", file.to_str().unwrap_or_default(), "--sign-with", key.to_str().unwrap_or_default()])?;
    Ok(())
}

/// Waits until `node` reads the string `expected` at `app/<path>` of `core` (`core get`
/// prints JSON).
fn wait_value(node: &NsNode, core: &str, path: &str, expected: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait_until(&format!("{} to read {path} = {expected}", node.name), timeout, || {
        let out = node.cli(&["core", "get", core, "app", path])?;
        Ok(out.status.success() && serde_json::from_slice::<Value>(&out.stdout).ok() == Some(Value::String(expected.into())))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nlog of {}:\n{}", node.name, node.log_tail(60)))?;
    Ok(start.elapsed())
}

/// The time of day of a log line (`2026-01-01T12:34:56.789012Z ...`, colours stripped), in
/// seconds.
fn log_time(line: &str) -> Option<f64> {
    let plain: String = {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                out.push(c);
            }
        }
        out
    };
    let time = plain.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From `node`'s log: how long after its first connection with `peer` (through the relay)
/// hole punching made a direct one.
fn relayed_to_direct(node: &NsNode, peer: &NsNode) -> Option<Duration> {
    let log = node.log();
    let first = log.lines().find(|l| l.contains("peer connected") && l.contains(&peer.peer_id)).and_then(log_time)?;
    let direct = log.lines().find(|l| l.contains("hole punching: direct connection") && l.contains(&peer.peer_id)).and_then(log_time)?;
    Some(Duration::from_secs_f64((direct - first).max(0.0)))
}

/// Whether `from` has a connection to `to`, and whether it is relayed only.
fn link(from: &NsNode, to: &NsNode) -> anyhow::Result<Option<bool>> {
    Ok(from.peer(&to.peer_id)?.map(|p| p["relayed"] == true))
}

#[test]
fn cone_nats_end_in_a_direct_connection_that_carries_content_and_core_changes() -> anyhow::Result<()> {
    let Some(dir) = test_dir("cone_nats_end_in_a_direct_connection_that_carries_content_and_core_changes")? else { return Ok(()) };
    let topology = Topology::build(&[(Nat::Cone, 1), (Nat::Cone, 1)])?;
    let boot = start_bootstrap(&topology, dir.path(), &[])?;
    let a = start_home(&topology, dir.path(), 0, 0, &boot)?;
    let b = start_home(&topology, dir.path(), 1, 0, &boot)?;

    // AutoNAT: the public node is public and a DHT server, the home nodes private and clients.
    wait_status(&boot, "reachability", "public", Duration::from_secs(60))?;
    for home in [&a, &b] {
        wait_status(home, "reachability", "private", Duration::from_secs(60))?;
        wait_status(home, "dht_mode", "client", Duration::from_secs(10))?;
    }
    assert_eq!(field(&boot, "dht_mode")?, "server");
    let external = field(&boot, "external_addresses")?;
    assert!(external.to_string().contains(PUBLIC_IP), "the public node's confirmed addresses: {external}");
    let text = boot.cli_ok(&["status"])?;
    assert!(text.contains("reachability:     public"), "{text}\n{}", boot.log_tail(80));

    // Both reserve a slot on the relay and announce their /p2p-circuit address.
    let a_circuit = wait_relay_address(&a, Duration::from_secs(60))?;
    wait_relay_address(&b, Duration::from_secs(60))?;
    assert!(a_circuit.contains("/p2p-circuit"), "{a_circuit}");

    // B knows only the core's address: it finds A through the DHT (provider record with A's
    // circuit address), reaches it through the relay, and hole punching makes it direct.
    let (key, core) = wallet(dir.path())?;
    delegate(&a, &core, &key)?;
    a.cli_ok(&["core", "set", &core, "app", "greeting", "\"hello from home A\""])?;
    let started = Instant::now();
    b.cli_ok(&["core", "follow", &core])?;
    wait_value(&b, &core, "greeting", "hello from home A", Duration::from_secs(90))?;
    wait_until("B's connection to A to be direct", Duration::from_secs(60), || Ok(link(&b, &a)? == Some(false)))
        .map_err(|e| anyhow::anyhow!("{e}\nB: {}\nA: {}", b.log_tail(80), a.log_tail(80)))?;
    let to_direct = started.elapsed();
    let punched = field(&a, "hole_punches_succeeded")?.as_u64().unwrap_or(0) + field(&b, "hole_punches_succeeded")?.as_u64().unwrap_or(0);
    assert!(punched >= 1, "a hole punch succeeded on one side");
    let peers = b.cli_ok(&["swarm", "peers"])?;
    assert!(peers.contains(&format!("/tcp/{}", common::netns::SWARM_PORT)) || peers.contains("[direct]"), "{peers}");
    assert!(!peers.contains("relayed only"), "{peers}");
    eprintln!("direct connection {to_direct:?} after B followed the core");
    match relayed_to_direct(&b, &a) {
        Some(d) => eprintln!("BENCH direct connection {d:?} after the relayed one (B's log)"),
        None => eprintln!("BENCH relayed→direct: not found in B's log"),
    }

    // A core write goes over the direct connection.
    let started = Instant::now();
    a.cli_ok(&["core", "set", &core, "app", "greeting", "\"direct now\""])?;
    let latency = wait_value(&b, &core, "greeting", "direct now", Duration::from_secs(30))?;
    eprintln!("BENCH core change A→B over the direct connection: {:?}", started.elapsed().max(latency));
    assert_eq!(link(&b, &a)?, Some(false), "still direct");

    // 20 MiB from A to B: only a direct connection carries content (the relay would stop at
    // its 1 MiB per circuit).
    let file = dir.path().join("twenty.bin");
    std::fs::write(&file, common::pseudo_random(20 << 20, 15))?;
    let cid = a.cli_ok(&["add", "-q", file.to_str().unwrap_or_default()])?;
    let out = dir.path().join("twenty.out");
    let started = Instant::now();
    let cat = b.cli(&["cat", &cid])?;
    assert!(cat.status.success(), "cat failed: {}", common::describe(&cat));
    std::fs::write(&out, &cat.stdout)?;
    assert!(cat.stdout == std::fs::read(&file)?, "B read back the same 20 MiB");
    let direct = started.elapsed();
    eprintln!("20 MiB over the punched connection in {direct:?}");
    let from_a = b.peer(&a.peer_id)?.map(|p| p["blocks_received"].as_u64().unwrap_or(0)).unwrap_or(0);
    assert!(from_a >= 80, "the blocks came from A ({from_a})");
    assert_eq!(link(&b, &a)?, Some(false), "still direct");

    // Baseline in the same run: the same 20 MiB between two nodes on this namespace's loopback.
    let x = common::TestNode::start(dir.path(), "loop-x", &[])?;
    let y = common::TestNode::start(dir.path(), "loop-y", &["--peer", &x.tcp_addr()])?;
    wait_until("the loopback nodes to connect", Duration::from_secs(30), || Ok(y.connected_peers()?.contains(&x.peer_id)))?;
    let cid_x = common::kubelt_ok(&x.repo, &["add", "-q", file.to_str().unwrap_or_default()])?;
    assert_eq!(cid_x, cid);
    let started = Instant::now();
    let cat = common::kubelt(&y.repo, &["cat", &cid])?;
    assert!(cat.status.success() && cat.stdout.len() == 20 << 20, "loopback cat: {}", common::describe(&cat));
    let loopback = started.elapsed();
    let mib_s = |d: Duration| 20.0 / d.as_secs_f64();
    eprintln!("BENCH 20 MiB cat: direct through the NATs {direct:?} ({:.1} MiB/s), loopback {loopback:?} ({:.1} MiB/s)", mib_s(direct), mib_s(loopback));
    Ok(())
}

/// Waits until both homes are private and hold a relay reservation; then A writes `greeting`
/// to a new core and B, knowing only the core's address, follows it until it reads it. Returns
/// the core and when B followed (seconds of the day, as in the logs).
fn follow_through_the_dht(dir: &Path, a: &NsNode, b: &NsNode, greeting: &str) -> anyhow::Result<(String, f64)> {
    for home in [a, b] {
        wait_status(home, "reachability", "private", Duration::from_secs(60))?;
    }
    wait_relay_address(a, Duration::from_secs(60))?;
    wait_relay_address(b, Duration::from_secs(60))?;
    let (key, core) = wallet(dir)?;
    delegate(a, &core, &key)?;
    a.cli_ok(&["core", "set", &core, "app", "greeting", &format!("\"{greeting}\"")])?;
    let followed = secs_of_day(std::time::SystemTime::now());
    b.cli_ok(&["core", "follow", &core])?;
    wait_value(b, &core, "greeting", greeting, Duration::from_secs(90))?;
    Ok((core, followed))
}

#[test]
fn symmetric_nats_sync_core_changes_through_the_relay_and_refuse_content() -> anyhow::Result<()> {
    let Some(dir) = test_dir("symmetric_nats_sync_core_changes_through_the_relay_and_refuse_content")? else { return Ok(()) };
    let topology = Topology::build(&[(Nat::Symmetric, 1), (Nat::Symmetric, 1)])?;
    let boot = start_bootstrap(&topology, dir.path(), &[])?;
    let a = start_home(&topology, dir.path(), 0, 0, &boot)?;
    // B gives up on a block after 10 s (60 s by default).
    let b = start_home_with(&topology, dir.path(), 1, 0, &boot, &[("fetch_timeout_secs = 60", "fetch_timeout_secs = 10")])?;
    let (core, _) = follow_through_the_dht(dir.path(), &a, &b, "through the relay")?;
    assert_eq!(link(&b, &a)?, Some(true), "only relayed: hole punching cannot pass symmetric NATs");
    let started = Instant::now();
    a.cli_ok(&["core", "set", &core, "app", "greeting", "\"still relayed\""])?;
    let relayed_latency = wait_value(&b, &core, "greeting", "still relayed", Duration::from_secs(60))?;
    eprintln!("BENCH core change A→B through the relay: {:?}", started.elapsed().max(relayed_latency));
    let peers = b.cli_ok(&["swarm", "peers"])?;
    assert!(peers.contains("relayed only"), "swarm peers says the connection is relayed: {peers}");

    // Content is refused over the relay, with a message that says why.
    let file = dir.path().join("two.bin");
    std::fs::write(&file, common::pseudo_random(2 << 20, 7))?;
    let cid = a.cli_ok(&["add", "-q", file.to_str().unwrap_or_default()])?;
    let cat = b.cli(&["cat", &cid])?;
    assert!(!cat.status.success(), "content must not cross the relay");
    let stderr = String::from_utf8_lossy(&cat.stderr);
    assert!(stderr.contains("only through a relay"), "a clear message: {}", common::describe(&cat));
    Ok(())
}

#[test]
fn autonat_follows_a_port_forward_and_the_relay_refuses_reservations_past_its_limit() -> anyhow::Result<()> {
    let Some(dir) = test_dir("autonat_follows_a_port_forward_and_the_relay_refuses_reservations_past_its_limit")? else { return Ok(()) };
    // A and C in two homes: the test's "internet" is a documentation range, so the nodes let
    // AutoNAT vouch for private addresses, and a neighbour on the same LAN would dial A back at
    // its LAN address and call it public (with the default, only global addresses count).
    let topology = Topology::build(&[(Nat::Cone, 1), (Nat::Cone, 1)])?;
    let boot = start_bootstrap(&topology, dir.path(), &[("relay_max_reservations = 128", "relay_max_reservations = 1")])?;
    let a = start_home(&topology, dir.path(), 0, 0, &boot)?;
    let c = start_home(&topology, dir.path(), 1, 0, &boot)?;
    for home in [&a, &c] {
        wait_status(home, "reachability", "private", Duration::from_secs(60))?;
    }
    // One slot: one of the two gets it, the other is refused and says so.
    wait_until("one reservation held and one refused", Duration::from_secs(60), || {
        let (sa, sc) = (a.status()?, c.status()?);
        let held = [&sa, &sc].iter().filter(|s| s["relay_addresses"].as_array().is_some_and(|a| !a.is_empty())).count();
        let refused = [&sa, &sc].iter().filter(|s| s["relay_error"].as_str().is_some_and(|e| e.contains("resource limit exceeded"))).count();
        Ok(held == 1 && refused == 1)
    })
    .map_err(|e| anyhow::anyhow!("{e}\nA: {:?}\nC: {:?}\nrelay: {}", a.status().ok(), c.status().ok(), boot.log_tail(40)))?;
    let relay = field(&boot, "relay_server")?;
    assert!(relay["reservations_denied"].as_u64().unwrap_or(0) >= 1, "{relay}");
    assert_eq!(relay["reservations"], 1, "{relay}");

    // The router forwards the swarm port to A: AutoNAT notices and A turns public, DHT server.
    topology.homes[0].forward_port(common::netns::SWARM_PORT, 0)?;
    wait_status(&a, "reachability", "public", Duration::from_secs(90))?;
    wait_status(&a, "dht_mode", "server", Duration::from_secs(10))?;
    let external = field(&a, "external_addresses")?;
    assert!(external.to_string().contains(&topology.homes[0].public_ip), "A's confirmed address is the router's: {external}");
    assert_eq!(field(&c, "reachability")?, "private", "C has no port forwarded");
    Ok(())
}

#[test]
fn the_relay_ends_circuits_at_their_time_and_byte_limits_and_the_home_node_says_why() -> anyhow::Result<()> {
    let Some(dir) = test_dir("the_relay_ends_circuits_at_their_time_and_byte_limits_and_the_home_node_says_why")? else { return Ok(()) };
    // Symmetric NATs: no hole punch, the connection stays relayed. The relay allows 64 KiB and
    // 8 s per circuit.
    let topology = Topology::build(&[(Nat::Symmetric, 1), (Nat::Symmetric, 1)])?;
    let limits = [("relay_circuit_bytes = 1048576", "relay_circuit_bytes = 65536"), ("relay_circuit_duration_secs = 120", "relay_circuit_duration_secs = 8")];
    let boot = start_bootstrap(&topology, dir.path(), &limits)?;
    let a = start_home(&topology, dir.path(), 0, 0, &boot)?;
    let b = start_home(&topology, dir.path(), 1, 0, &boot)?;
    let (core, _) = follow_through_the_dht(dir.path(), &a, &b, "small enough")?;
    assert_eq!(link(&b, &a)?, Some(true), "relayed only");

    // Time: the relay ends each circuit after 8 s; B says which limit ended it (and B, which
    // follows A's core, connects again through a new circuit).
    let relay_counter = |name: &str| -> anyhow::Result<u64> { Ok(field(&boot, "relay_server")?[name].as_u64().unwrap_or(0)) };
    wait_until("the relay to end a circuit at its time limit", Duration::from_secs(40), || Ok(relay_counter("circuits_closed_at_time_limit")? >= 1))
        .map_err(|e| anyhow::anyhow!("{e}\nrelay: {}", boot.log_tail(40)))?;
    let said = |node: &NsNode| -> anyhow::Result<String> { Ok(field(node, "last_relay_cut")?.as_str().unwrap_or_default().to_string()) };
    wait_until("B to say the relay's time limit ended the circuit", Duration::from_secs(20), || Ok(said(&b)?.contains("time limit of 8 s per circuit")))
        .map_err(|e| anyhow::anyhow!("{e}\nB said: {:?}\n{}", said(&b).ok(), b.log_tail(60)))?;
    let text = b.cli_ok(&["status"])?;
    assert!(text.contains("relayed cut:") && text.contains("time limit of 8 s"), "{text}");
    wait_until("B to reach A through the relay again", Duration::from_secs(20), || Ok(link(&b, &a)? == Some(true)))?;

    // Bytes: a 100 KiB value (one argument stays under Linux's 128 KiB) cannot cross a 64 KiB
    // circuit. The relay ends the circuit at its byte limit (every new one too, as catch-up
    // tries again), B says so, and the value waits for a direct connection.
    let big = format!("\"{}\"", "x".repeat(100 << 10));
    a.cli_ok(&["core", "set", &core, "app", "big", &big])?;
    wait_until("the relay to end a circuit at its byte limit", Duration::from_secs(30), || Ok(relay_counter("circuits_closed_at_byte_limit")? >= 1))
        .map_err(|e| anyhow::anyhow!("{e}\nrelay: {}", boot.log_tail(40)))?;
    wait_until("B to say the relay's byte limit most likely ended the circuit", Duration::from_secs(30), || {
        Ok(said(&b)?.contains("limit of 64 KiB per circuit ("))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nB said: {:?}\n{}", said(&b).ok(), b.log_tail(60)))?;
    let message = said(&b)?;
    assert!(message.contains(&boot.peer_id) && message.contains(&a.peer_id), "names the relay and the peer: {message}");
    assert!(message.contains("never content"), "{message}");
    let got = b.cli(&["core", "get", &core, "app", "big"])?;
    assert!(!(got.status.success() && got.stdout.len() > 64 << 10), "100 KiB crossed a 64 KiB circuit");
    Ok(())
}

/// One run of the NAT benchmark: what it measured.
struct NatRun {
    /// From starting the nodes to the direct connection.
    start_to_direct: Option<Duration>,
    /// From B's `core follow` (B knows only the core's address) to the direct connection.
    follow_to_direct: Option<Duration>,
    /// From the first (relayed) connection between A and B to the direct one.
    relayed_to_direct: Option<Duration>,
    /// Core changes A→B: from A's publish to B's apply, and whether the connection was direct.
    latencies: Vec<Duration>,
    direct: bool,
}

/// Seconds of the day (UTC) of `t`, as log lines give them.
fn secs_of_day(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() % 86_400.0).unwrap_or(0.0)
}

/// The times of the log lines of `node` containing every one of `needles`.
fn log_times(node: &NsNode, needles: &[&str]) -> Vec<f64> {
    node.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).filter_map(log_time).collect()
}

/// How long a hole-punched connection is given to come up before a run counts as relayed.
const DIRECT_WAIT: Duration = Duration::from_secs(10);

fn nat_run(dir: &Path, nats: [Nat; 2]) -> anyhow::Result<NatRun> {
    let topology = Topology::build(&[(nats[0], 1), (nats[1], 1)])?;
    let start = secs_of_day(std::time::SystemTime::now());
    let boot = start_bootstrap(&topology, dir, &[])?;
    let a = start_home(&topology, dir, 0, 0, &boot)?;
    let b = start_home(&topology, dir, 1, 0, &boot)?;
    let (core, followed) = follow_through_the_dht(dir, &a, &b, "0")?;
    let direct = wait_until("a direct connection", DIRECT_WAIT, || Ok(link(&b, &a)? == Some(false))).is_ok();
    let polled = secs_of_day(std::time::SystemTime::now());
    let (mut first, mut punched) = (f64::MAX, f64::MAX);
    for (node, other) in [(&a, &b), (&b, &a)] {
        first = log_times(node, &["peer connected", &other.peer_id]).into_iter().fold(first, f64::min);
        punched = log_times(node, &["hole punching: direct connection", &other.peer_id]).into_iter().fold(punched, f64::min);
    }
    let at = if !direct {
        None
    } else if punched < f64::MAX {
        Some(punched)
    } else {
        Some(polled)
    };
    let since = |from: f64| at.map(|t| Duration::from_secs_f64((t - from).max(0.0)));
    let relayed_to_direct = if first < f64::MAX { since(first) } else { None };
    if direct {
        // The relayed connection closes 2 s after the direct one is up (the handover).
        std::thread::sleep(Duration::from_millis(2500));
    }
    let mut latencies = Vec::new();
    for i in 1..=5 {
        let value = format!("{i}");
        let (published, applied) = (log_times(&a, &["published a change"]).len(), log_times(&b, &["applied a change from gossip"]).len());
        a.cli_ok(&["core", "set", &core, "app", "greeting", &format!("\"{value}\"")])?;
        wait_value(&b, &core, "greeting", &value, Duration::from_secs(30))?;
        let (p, q) = (log_times(&a, &["published a change"]), log_times(&b, &["applied a change from gossip"]));
        // Only changes that went by gossip (not by a catch-up) are timed.
        if p.len() == published + 1 && q.len() == applied + 1 {
            latencies.push(Duration::from_secs_f64((q[applied] - p[published]).max(0.0)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let still_direct = link(&b, &a)? == Some(false);
    Ok(NatRun { start_to_direct: since(start), follow_to_direct: since(followed), relayed_to_direct, latencies, direct: direct && still_direct })
}

/// The `q` quantile of `values` (nearest rank), in seconds; NaN when empty.
fn quantile(values: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// NAT traversal (`scripts/bench.sh nat`): KUBELT_BENCH_NAT_RUNS runs (20 by default) per
/// pairing of NATs, each with a fresh topology and fresh nodes. A run starts the relay and two
/// homes, waits for their verdicts and reservations, lets A write a core and B follow it, and
/// counts as direct if a direct connection is up within [`DIRECT_WAIT`]. Then five core changes
/// A→B are timed from A's publish to B's apply (their logs, one clock). One line per pairing,
/// then the relayed/direct latency ratio (goal < 2).
#[test]
#[ignore]
fn bench_nat_traversal() -> anyhow::Result<()> {
    let Some(dir) = test_dir("bench_nat_traversal")? else { return Ok(()) };
    let runs: usize = std::env::var("KUBELT_BENCH_NAT_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    // KUBELT_BENCH_NAT_PAIRINGS=cone/cone,... runs only those.
    let only = std::env::var("KUBELT_BENCH_NAT_PAIRINGS").ok();
    let pairings = [("cone/cone", [Nat::Cone, Nat::Cone]), ("cone/symmetric", [Nat::Cone, Nat::Symmetric]), ("symmetric/symmetric", [Nat::Symmetric, Nat::Symmetric])]
        .into_iter()
        .filter(|(label, _)| only.as_deref().is_none_or(|only| only.split(',').any(|l| l.trim() == *label)));
    let (mut relayed_latency, mut direct_latency) = (Vec::new(), Vec::new());
    for (label, nats) in pairings {
        let mut done = Vec::new();
        let mut failed = 0;
        for run in 0..runs {
            let run_dir = dir.path().join(format!("{}-{run}", label.replace('/', "-")));
            match nat_run(&run_dir, nats) {
                Ok(r) => {
                    // One line per run: progress through a long benchmark, and the outliers.
                    let secs = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
                    let changes: Vec<String> = r.latencies.iter().map(|l| format!("{:.1}", l.as_secs_f64() * 1e3)).collect();
                    println!(
                        "NAT {label} run {run}: {}, follow → direct {}, changes A→B [{}] ms",
                        if r.direct { "direct" } else { "relayed" },
                        secs(r.follow_to_direct),
                        changes.join(", ")
                    );
                    done.push(r)
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("NAT {label} run {run} failed: {e:#}");
                }
            }
        }
        let direct: Vec<&NatRun> = done.iter().filter(|r| r.direct).collect();
        let of = |f: fn(&NatRun) -> Option<Duration>| -> Vec<Duration> { direct.iter().filter_map(|r| f(r)).collect() };
        let (start, follow, relayed) = (of(|r| r.start_to_direct), of(|r| r.follow_to_direct), of(|r| r.relayed_to_direct));
        let mut latency = Vec::new();
        for r in &done {
            latency.extend(r.latencies.iter().copied());
            if r.direct { &mut direct_latency } else { &mut relayed_latency }.extend(r.latencies.iter().copied());
        }
        let kind = match (direct.len(), done.len()) {
            (0, _) => "relayed",
            (d, n) if d == n => "direct",
            _ => "mixed",
        };
        println!(
            "NAT {label}: {} runs ({failed} failed), direct in {}/{} ({:.0}%); to direct: from follow p50 {:.2} s p99 {:.2} s, \
             from the relayed connection p50 {:.2} s p99 {:.2} s, from start p50 {:.1} s p99 {:.1} s; \
             core change A→B ({kind}) p50 {:.1} ms p99 {:.1} ms ({} changes)",
            done.len(),
            direct.len(),
            done.len(),
            100.0 * direct.len() as f64 / done.len().max(1) as f64,
            quantile(&follow, 0.5),
            quantile(&follow, 0.99),
            quantile(&relayed, 0.5),
            quantile(&relayed, 0.99),
            quantile(&start, 0.5),
            quantile(&start, 0.99),
            quantile(&latency, 0.5) * 1e3,
            quantile(&latency, 0.99) * 1e3,
            latency.len(),
        );
    }
    let (r, d) = (quantile(&relayed_latency, 0.5), quantile(&direct_latency, 0.5));
    println!(
        "NAT core change A→B: relayed p50 {:.1} ms ({} changes), direct p50 {:.1} ms ({} changes): relayed/direct {:.2} (goal < 2)",
        r * 1e3,
        relayed_latency.len(),
        d * 1e3,
        direct_latency.len(),
        r / d
    );
    Ok(())
}
