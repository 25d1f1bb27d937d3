//! Interop with the real Kubo: same CIDs, and blocks over bitswap in both directions.

mod common;

use std::time::Duration;

use common::kubo::Kubo;
use common::{bitswap_stat, kubelt, kubelt_ok, pseudo_random, wait_until, TestNode};

#[test]
fn kubelt_and_kubo_exchange_files_over_bitswap_with_equal_cids() -> anyhow::Result<()> {
    let Some(mut kubo) = Kubo::start()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(dir.path(), "k", &["--peer", &kubo.tcp_addr()])?;
    wait_until("kubelt to connect to Kubo", Duration::from_secs(20), || Ok(node.connected_peers()?.contains(&kubo.peer_id)))?;

    // Kubo adds, kubelt fetches; the CID kubelt computes for the same bytes is Kubo's.
    let from_kubo = dir.path().join("from-kubo.bin");
    std::fs::write(&from_kubo, pseudo_random(2 * 1024 * 1024 + 5, 10))?;
    let kubo_cid = kubo.add(&from_kubo)?;
    let out = kubelt(&node.repo, &["cat", &kubo_cid])?;
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(out.stdout == std::fs::read(&from_kubo)?, "bytes from Kubo differ");
    let ours = kubelt_ok(&node.repo, &["add", "-q", from_kubo.to_str().unwrap_or_default()])?;
    assert_eq!(ours, kubo_cid);

    // kubelt adds, Kubo fetches.
    let from_kubelt = dir.path().join("from-kubelt.bin");
    std::fs::write(&from_kubelt, pseudo_random(1024 * 1024 + 3, 11))?;
    let cid = kubelt_ok(&node.repo, &["add", "-q", from_kubelt.to_str().unwrap_or_default()])?;
    let out = dir.path().join("kubo-got.bin");
    assert!(kubo.get(&cid, &out, Duration::from_secs(60))?, "Kubo could not fetch {cid}");
    assert!(std::fs::read(&out)? == std::fs::read(&from_kubelt)?);
    assert!(bitswap_stat(&node, "blocks_sent")? > 0);
    Ok(())
}

#[test]
fn a_file_held_by_two_kubelt_peers_and_kubo_is_fetched_from_several_of_them() -> anyhow::Result<()> {
    let Some(mut kubo) = Kubo::start()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("shared.bin");
    // Several times the blocks one peer may have in flight, so the session has reason to spread.
    std::fs::write(&file, pseudo_random(64 * 1024 * 1024, 12))?;
    let cid = kubo.add(&file)?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &[])?;
    for holder in [&a, &b] {
        assert_eq!(kubelt_ok(&holder.repo, &["add", "-q", file.to_str().unwrap_or_default()])?, cid);
    }
    let c = TestNode::start(dir.path(), "c", &["--peer", &a.tcp_addr(), "--peer", &b.tcp_addr(), "--peer", &kubo.tcp_addr()])?;
    wait_until("c to connect to all three", Duration::from_secs(20), || {
        let peers = c.connected_peers()?;
        Ok([&a.peer_id, &b.peer_id, &kubo.peer_id].iter().all(|p| peers.contains(p)))
    })?;
    let out = kubelt(&c.repo, &["cat", &cid])?;
    assert!(out.status.success() && out.stdout == std::fs::read(&file)?);
    // c counts the blocks each peer served it: Kubo's share is seen, not inferred.
    let peers = c.call("swarm_peers", serde_json::Value::Null)?;
    let served_by = |peer: &str| -> anyhow::Result<u64> {
        let entry = peers.as_array().into_iter().flatten().find(|p| p["peer_id"] == peer);
        entry.and_then(|p| p["blocks_received"].as_u64()).ok_or_else(|| anyhow::anyhow!("c lists no block count for {peer}: {peers}"))
    };
    let (from_a, from_b, from_kubo) = (served_by(&a.peer_id)?, served_by(&b.peer_id)?, served_by(&kubo.peer_id)?);
    let received = bitswap_stat(&c, "blocks_received")?;
    let counts = format!("blocks came from a: {from_a}, b: {from_b}, Kubo: {from_kubo} (of {received})");
    println!("{counts}");
    assert_eq!(from_a + from_b + from_kubo, received, "every block received is counted against its sender; {counts}");
    assert!(from_kubo > 0, "Kubo served no block; {counts}");
    assert!(from_a + from_b > 0, "no Kubelt peer served a block; {counts}");
    Ok(())
}
