//! Changes that fail verification are rejected by the first replica that receives them and never
//! travel further: an attacker connected only to node `a` publishes forged changes on the core's
//! topic; `a` rejects them, and `c` (connected to `a`) never sees them, while a valid change
//! from `a` reaches `c` through the same path.

mod common;

use std::time::Duration;

use common::{kubelt_ok, wait_until, TestNode};
use futures::StreamExt;
use kubelt_proto::Message;
use kubelt_protocol::core::{Cores, DevWallet};
use kubelt_protocol::store::Store;
use kubelt_protocol::{swarm, sync};
use libp2p::identity::Keypair;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_changes_are_rejected_and_never_forwarded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let owner_key = dir.path().join("owner.key");
    let owner = DevWallet::create(&owner_key)?;
    let core = owner.address();
    let address = core.to_checksum();
    let a = TestNode::start(dir.path(), "a", &[])?;
    let c = TestNode::start(dir.path(), "c", &["--peer", &a.tcp_addr()])?;
    let message = kubelt_ok(&a.repo, &["core", "delegate", &address])?;
    std::fs::write(dir.path().join("a.siwe"), message)?;
    kubelt_ok(&a.repo, &["core", "submit", "--message-file", &dir.path().join("a.siwe").to_string_lossy(), "--sign-with", &owner_key.to_string_lossy()])?;
    kubelt_ok(&c.repo, &["core", "follow", &address])?;

    // The attacker: a node of its own, with a valid delegation for *another* core, whose
    // signed changes it relabels for this core, plus plain garbage.
    let attacker_key = Keypair::generate_ed25519();
    let other_owner = DevWallet::random();
    let mut attacker_cores = Cores::load(Store::open(dir.path().join("attacker-cores"))?, Default::default())?;
    let delegation = other_owner.delegate(&attacker_key.public().to_peer_id(), &["*"], Duration::from_secs(3600), time::OffsetDateTime::now_utc())?;
    let replica = attacker_cores.own(delegation.clone())?;
    let mut relabelled = replica.set("app", "stolen", &json!("forged"), &attacker_key, &delegation)?;
    relabelled.core = core.to_lower_hex();
    let forgeries = vec![relabelled.encode_to_vec(), b"not a protobuf at all \xff\xff".to_vec()];

    let mut attacker = swarm::build(attacker_key, &swarm::Config::default(), Store::open(dir.path().join("attacker"))?)?;
    attacker.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    attacker.behaviour_mut().gossipsub.subscribe(&sync::topic(&core))?;
    attacker.dial(a.tcp_addr().parse::<libp2p::Multiaddr>()?)?;
    let attack = tokio::spawn(async move {
        let mut published = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                _ = attacker.select_next_some() => {}
                _ = tick.tick() => {
                    if published < 10 {
                        for forged in &forgeries {
                            if attacker.behaviour_mut().gossipsub.publish(sync::topic(&core), forged.clone()).is_ok() {
                                published += 1;
                            }
                        }
                    }
                }
            }
        }
    });

    wait_until("a to reject the forged changes", Duration::from_secs(30), || {
        let log = a.log();
        Ok(log.contains("rejected a change") && log.contains("malformed envelope"))
    })?;
    // A valid change travels a -> c through the same mesh...
    a.call("core_set", json!({ "address": address, "namespace": "app", "path": "real", "value": "valid" }))?;
    wait_until("c to receive the valid change", Duration::from_secs(30), || {
        Ok(c.call("core_get", json!({ "address": address, "namespace": "app", "path": "real" }))? == json!("valid"))
    })?;
    attack.abort();
    // ...but a never forwarded anything forged to c (the attacker may reach c directly through
    // the DHT; c then rejects it itself, with the attacker as the source), and nothing forged
    // is in either document.
    let log = c.log();
    let forwarded_by_a: Vec<&str> = log.lines().filter(|l| l.contains("rejected") && l.contains(&a.peer_id)).collect();
    assert!(forwarded_by_a.is_empty(), "a forwarded a forged change to c:\n{log}");
    for node in [&a, &c] {
        let app = node.call("core_get", json!({ "address": address, "namespace": "app" }))?;
        assert_eq!(app.get("stolen"), None, "{}: {app}", node.name);
        assert_eq!(app["real"], Value::from("valid"));
    }
    Ok(())
}
