//! Real NATs on this machine: network namespaces joined by veth pairs, Linux routers doing
//! nftables masquerading, and `kubelt` processes inside them.
//!
//! Every namespace is held by a `sleep` process started with `unshare -n` (its own network
//! namespace, nothing else) and is entered by pid (`nsenter --net=/proc/<pid>/ns/net`). So no
//! named namespace exists: `ip netns add` would bind-mount files under `/run/netns`, which
//! lives in the *mount* namespace — shared with the host even inside `scripts/test.sh`'s
//! `unshare -n` — and would leak names between parallel tests and outlive a killed test run.
//! Here, killing the holders (the guard's `Drop`, or the kernel: the holders get SIGKILL when
//! the test's thread ends, `PR_SET_PDEATHSIG`) removes the namespaces and with them every veth,
//! bridge and nftables rule. Nothing is created in the test's own namespace, so the test runs
//! the same inside `scripts/test.sh`'s namespace or outside it.
//!
//! Addresses: the "internet" is 198.51.100.0/24 (TEST-NET-2, never routed anywhere), homes are
//! 192.168.<n>.0/24 behind their router. Only these namespaces can reach them.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::{describe, kubelt_bin, wait_until};

/// How a home router maps its LAN's connections to its public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (Linux masquerade keeps the source port): hole punching
    /// works.
    Cone,
    /// A new random port for every connection (`masquerade fully-random`): the port a peer
    /// observed is useless to anyone else, hole punching fails.
    Symmetric,
}

/// The `nft` binary, if installed (Debian puts it in /usr/sbin, not always in a test's PATH).
pub fn nft_path() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("nft")).find(|p| p.is_file())
}

/// Why NAT tests cannot run here, if they cannot: not root, no `nft`, no namespaces.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces and nftables)".into());
    }
    if nft_path().is_none() {
        return Some("`nft` is not installed (Debian package nftables)".into());
    }
    match Command::new("unshare").args(["-n", "true"]).status() {
        Ok(s) if s.success() => None,
        _ => Some("cannot create network namespaces (`unshare -n` failed)".into()),
    }
}

/// A network namespace, held by a `sleep` process.
pub struct Host {
    pub name: String,
    holder: Child,
}

impl Host {
    fn new(name: &str) -> anyhow::Result<Host> {
        let mut command = Command::new("unshare");
        command.args(["-n", "sleep", "86400"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: prctl in the child between fork and exec touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let holder = command.spawn().context("cannot start a namespace holder (unshare -n)")?;
        let host = Host { name: name.to_string(), holder };
        // The holder has its namespace once `unshare` has exec'd `sleep`.
        wait_until(&format!("namespace {name}"), Duration::from_secs(10), || {
            Ok(std::fs::read_link(format!("/proc/{}/exe", host.pid()))?.to_string_lossy().ends_with("sleep"))
        })?;
        host.sh(&["ip", "link", "set", "lo", "up"])?;
        Ok(host)
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `nsenter` arguments that run a program in this namespace.
    pub fn nsenter(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/proc/{}/ns/net", self.pid()), "--".into()]
    }

    /// Runs a command in this namespace; fails with its output when it fails.
    pub fn sh(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.sh_input(args, None)
    }

    fn sh_input(&self, args: &[&str], input: Option<&str>) -> anyhow::Result<Output> {
        use std::io::Write;
        let program = if args[0] == "nft" { nft_path().context("nft is not installed")? } else { PathBuf::from(args[0]) };
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .arg("--")
            .arg(program)
            .args(&args[1..])
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("{} in {}: {}", args.join(" "), self.name, describe(&output));
        }
        Ok(output)
    }

    /// Loads an nftables ruleset.
    pub fn nft(&self, ruleset: &str) -> anyhow::Result<()> {
        self.sh_input(&["nft", "-f", "-"], Some(ruleset)).map(|_| ())
    }

    /// A veth pair from here (`local`) to `other` (`remote`).
    fn link(&self, local: &str, other: &Host, remote: &str) -> anyhow::Result<()> {
        let netns = format!("/proc/{}/ns/net", other.pid());
        self.sh(&["ip", "link", "add", local, "type", "veth", "peer", "name", remote, "netns", &netns])?;
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A home: a router doing NAT and the hosts on its LAN.
pub struct Home {
    pub router: Host,
    pub hosts: Vec<Host>,
    /// The router's address on the internet.
    pub public_ip: String,
    lan: u8,
}

impl Home {
    /// The LAN address of host `i`.
    pub fn host_ip(&self, i: usize) -> String {
        format!("192.168.{}.{}", self.lan, i + 2)
    }

    /// Forwards TCP and UDP `port` on the router's public address to host `i` (a DNAT rule).
    pub fn forward_port(&self, port: u16, i: usize) -> anyhow::Result<()> {
        let to = self.host_ip(i);
        self.router.nft(&format!(
            "add rule ip nat prerouting iifname \"wan\" tcp dport {port} dnat to {to}:{port}\n\
             add rule ip nat prerouting iifname \"wan\" udp dport {port} dnat to {to}:{port}\n"
        ))
    }
}

/// The "internet" (one namespace with a bridge, where the public node lives) and the homes.
/// Dropping it removes everything (hosts are dropped with it).
pub struct Topology {
    /// The public host: 198.51.100.1, on the bridge itself.
    pub internet: Host,
    pub homes: Vec<Home>,
}

/// The public host's address.
pub const PUBLIC_IP: &str = "198.51.100.1";

impl Topology {
    /// Builds the internet and one home per entry of `homes`: its NAT and how many hosts.
    pub fn build(homes: &[(Nat, usize)]) -> anyhow::Result<Topology> {
        let internet = Host::new("internet")?;
        internet.sh(&["ip", "link", "add", "br0", "type", "bridge"])?;
        internet.sh(&["ip", "addr", "add", &format!("{PUBLIC_IP}/24"), "dev", "br0"])?;
        internet.sh(&["ip", "link", "set", "br0", "up"])?;
        let mut topology = Topology { internet, homes: vec![] };
        for (n, (nat, hosts)) in homes.iter().enumerate() {
            let home = topology.add_home(n, *nat, *hosts)?;
            topology.homes.push(home);
        }
        Ok(topology)
    }

    fn add_home(&self, n: usize, nat: Nat, hosts: usize) -> anyhow::Result<Home> {
        let lan = (n + 1) as u8;
        let public_ip = format!("198.51.100.{}", n + 2);
        let router = Host::new(&format!("router{n}"))?;
        let port = format!("wan{n}");
        self.internet.link(&port, &router, "wan")?;
        self.internet.sh(&["ip", "link", "set", &port, "master", "br0", "up"])?;
        router.sh(&["ip", "addr", "add", &format!("{public_ip}/24"), "dev", "wan"])?;
        router.sh(&["ip", "link", "set", "wan", "up"])?;
        router.sh(&["ip", "link", "add", "lan0", "type", "bridge"])?;
        router.sh(&["ip", "addr", "add", &format!("192.168.{lan}.1/24"), "dev", "lan0"])?;
        router.sh(&["ip", "link", "set", "lan0", "up"])?;
        router.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let masquerade = match nat {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        // A home router: NAT out, nothing unsolicited in (dropped, not refused, as routers do;
        // a refusal would reset the other side's half of a simultaneous TCP open).
        router.nft(&format!(
            "table ip nat {{\n\
               chain postrouting {{\n  type nat hook postrouting priority srcnat;\n  oifname \"wan\" {masquerade}\n}}\n\
               chain prerouting {{\n  type nat hook prerouting priority dstnat;\n}}\n\
             }}\n\
             table inet filter {{\n\
               chain input {{\n  type filter hook input priority 0; policy accept;\n  iifname \"wan\" ct state established,related accept\n  iifname \"wan\" drop\n}}\n\
               chain forward {{\n  type filter hook forward priority 0; policy accept;\n  iifname \"wan\" ct state established,related accept\n  iifname \"wan\" ct status dnat accept\n  iifname \"wan\" drop\n}}\n\
             }}\n"
        ))?;
        let mut home = Home { router, hosts: vec![], public_ip, lan };
        for i in 0..hosts {
            let host = Host::new(&format!("home{n}-host{i}"))?;
            let port = format!("h{i}");
            home.router.link(&port, &host, "eth0")?;
            home.router.sh(&["ip", "link", "set", &port, "master", "lan0", "up"])?;
            host.sh(&["ip", "addr", "add", &format!("{}/24", home.host_ip(i)), "dev", "eth0"])?;
            host.sh(&["ip", "link", "set", "eth0", "up"])?;
            host.sh(&["ip", "route", "add", "default", "via", &format!("192.168.{lan}.1")])?;
            home.hosts.push(host);
        }
        Ok(home)
    }
}

/// What the nodes log (KUBELT_TEST_LOG overrides it): hole punching and the relay, and the
/// event loop's dials, lookups and gossip (the NAT benchmark reads change latencies there).
const DEFAULT_LOG: &str = "info,libp2p_dcutr=debug,libp2p_relay=debug,\
                           kubelt_protocol::node::event_loop::net=debug,kubelt_protocol::node::event_loop::cores=debug";

/// The swarm port every node in these tests listens on (TCP and QUIC), each in its namespace.
pub const SWARM_PORT: u16 = 4001;

/// A `kubelt run` inside a namespace. Its API listens on the namespace's loopback, so
/// everything is asked through the CLI run in the same namespace — as a person at that machine
/// would.
pub struct NsNode {
    pub name: String,
    pub repo: PathBuf,
    pub peer_id: String,
    nsenter: Vec<String>,
    child: Option<Child>,
}

impl NsNode {
    /// Creates a repo under `dir/name` (with AutoNAT allowed to judge private addresses and
    /// probing every 2 s, then `edits` applied to `config.toml`) and starts a node in `host`.
    pub fn start(host: &Host, dir: &Path, name: &str, edits: &[(&str, &str)], extra: &[&str]) -> anyhow::Result<NsNode> {
        let repo = dir.join(name);
        super::kubelt_ok(&repo, &["init"])?;
        super::edit_config(&repo, "autonat_private_addresses = false", "autonat_private_addresses = true")?;
        super::edit_config(&repo, "autonat_interval_secs = 90", "autonat_interval_secs = 2")?;
        for (from, to) in edits {
            super::edit_config(&repo, from, to)?;
        }
        let log = std::fs::File::create(repo.join("node.log"))?;
        let nsenter = host.nsenter();
        let mut command = Command::new(&nsenter[0]);
        command
            .args(&nsenter[1..])
            .arg(kubelt_bin())
            .arg("--repo")
            .arg(&repo)
            .arg("run")
            .args(["--listen", &format!("/ip4/0.0.0.0/tcp/{SWARM_PORT}"), "--listen", &format!("/ip4/0.0.0.0/udp/{SWARM_PORT}/quic-v1")])
            .args(["--api", "127.0.0.1:0", "--gateway", "127.0.0.1:0", "--app-api", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", std::env::var("KUBELT_TEST_LOG").unwrap_or_else(|_| DEFAULT_LOG.into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl in the child between fork and exec touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().context("cannot start kubelt in a namespace")?;
        let mut node = NsNode { name: name.to_string(), repo: repo.clone(), peer_id: String::new(), nsenter, child: Some(child) };
        let api = repo.join("api");
        wait_until(&format!("{name} to serve its API"), Duration::from_secs(30), || {
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{name} exited with {status}: {}", node.log());
            }
            Ok(api.exists())
        })?;
        let id: Value = serde_json::from_str(&node.cli_ok(&["id", "--json"])?)?;
        node.peer_id = id["peer_id"].as_str().unwrap_or_default().to_string();
        Ok(node)
    }

    /// Runs `kubelt --repo <repo> ARGS` in the node's namespace.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.nsenter[0])
            .args(&self.nsenter[1..])
            .arg(kubelt_bin())
            .arg("--repo")
            .arg(&self.repo)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()?)
    }

    /// Runs a command that must succeed; its trimmed stdout.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("{}: kubelt {args:?} failed: {}", self.name, describe(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `kubelt status --json`.
    pub fn status(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.cli_ok(&["status", "--json"])?)?)
    }

    /// `kubelt swarm peers --json`: the entry for `peer`, if connected.
    pub fn peer(&self, peer: &str) -> anyhow::Result<Option<Value>> {
        let peers: Value = serde_json::from_str(&self.cli_ok(&["swarm", "peers", "--json"])?)?;
        Ok(peers.as_array().into_iter().flatten().find(|p| p["peer_id"] == peer).cloned())
    }

    /// The node's TCP address on `ip`, with its peer id.
    pub fn addr(&self, ip: &str) -> String {
        format!("/ip4/{ip}/tcp/{SWARM_PORT}/p2p/{}", self.peer_id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.repo.join("node.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
