//! Content as a user moves it: `kubelt add/cat/get/pin/repo gc/dag` between real nodes, the
//! gateway, providers found through the DHT, and bad input.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{bitswap_stat, describe, edit_config, kubelt, kubelt_ok, pseudo_random, start_dht_client, TestNode};
use kubelt_protocol::testing::{car_of, symlink_and_directory_of_one_name};

#[test]
fn content_moves_both_ways_between_nodes_and_through_the_gateway() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TestNode::start(dir.path(), "a", &[])?;
    let b = TestNode::start(dir.path(), "b", &["--peer", &a.tcp_addr()])?;
    common::wait_until("b to connect to a", Duration::from_secs(10), || Ok(b.connected_peers()?.contains(&a.peer_id)))?;

    // a -> b: a file of a few MiB, through cat.
    let file_a = dir.path().join("from-a.bin");
    let bytes_a = pseudo_random(3 * 1024 * 1024 + 17, 1);
    std::fs::write(&file_a, &bytes_a)?;
    let cid_a = kubelt_ok(&a.repo, &["add", "-q", file_a.to_str().unwrap_or_default()])?;
    let out = kubelt(&b.repo, &["cat", &cid_a])?;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(out.stdout == bytes_a, "cat on b returned {} bytes, expected {}", out.stdout.len(), bytes_a.len());

    // b -> a: a CIDv1 file through get.
    let file_b = dir.path().join("from-b.bin");
    let bytes_b = pseudo_random(700_000, 2);
    std::fs::write(&file_b, &bytes_b)?;
    let cid_b = kubelt_ok(&b.repo, &["add", "-q", "--cid-version", "1", file_b.to_str().unwrap_or_default()])?;
    assert!(cid_b.starts_with("bafy"), "{cid_b}");
    let got = dir.path().join("got-b.bin");
    kubelt_ok(&a.repo, &["get", &cid_b, "-o", got.to_str().unwrap_or_default()])?;
    assert!(std::fs::read(&got)? == bytes_b);

    // A directory tree a -> b.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    std::fs::write(tree.join("b.txt"), "bee\n")?;
    std::fs::write(tree.join("a.txt"), "ay\n")?;
    std::fs::write(tree.join("sub/c.bin"), pseudo_random(300_000, 3))?;
    let cid_tree = kubelt_ok(&a.repo, &["add", "-r", "-q", tree.to_str().unwrap_or_default()])?;
    let got_tree = dir.path().join("got-tree");
    kubelt_ok(&b.repo, &["get", &cid_tree, "-o", got_tree.to_str().unwrap_or_default()])?;
    assert_eq!(std::fs::read(got_tree.join("sub/c.bin"))?, std::fs::read(tree.join("sub/c.bin"))?);
    assert_eq!(std::fs::read_to_string(got_tree.join("a.txt"))?, "ay\n");
    assert_eq!(kubelt_ok(&b.repo, &["cat", &format!("{cid_tree}/b.txt")])?, "bee");

    // The gateway needs no secret and sends length and type.
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let response = agent.get(&format!("{}ipfs/{cid_tree}/a.txt", b.gateway_url())).call()?;
    assert_eq!(response.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(response.header("content-length"), Some("3"));
    assert_eq!(response.into_string()?, "ay\n");
    let response = agent.get(&format!("{}ipfs/{cid_a}", b.gateway_url())).call()?;
    assert_eq!(response.header("content-length"), Some(bytes_a.len().to_string().as_str()));
    match agent.get(&format!("{}ipfs/not-a-cid", b.gateway_url())).call() {
        Err(ureq::Error::Status(400, r)) => assert!(r.into_string()?.contains("not-a-cid")),
        other => anyhow::bail!("expected 400 for an invalid CID, got {other:?}"),
    }
    match agent.get(&format!("{}ipfs/{cid_tree}/nope.txt", b.gateway_url())).call() {
        Err(ureq::Error::Status(404, r)) => assert!(r.into_string()?.contains("nope.txt")),
        other => anyhow::bail!("expected 404 for a missing path, got {other:?}"),
    }

    // Blocks moved over bitswap, both ways.
    assert!(bitswap_stat(&a, "blocks_sent")? > 0 && bitswap_stat(&b, "blocks_sent")? > 0);
    Ok(())
}

#[test]
fn unknown_and_invalid_cids_fail_clearly_and_quickly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("n");
    kubelt_ok(&repo, &["init"])?;
    let config = std::fs::read_to_string(repo.join("config.toml"))?.replace("fetch_timeout_secs = 60", "fetch_timeout_secs = 2");
    std::fs::write(repo.join("config.toml"), config)?;
    let node = TestNode::start_on(&repo, "n", &[])?;

    let out = kubelt(&node.repo, &["cat", "QmNotACid"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid CID 'QmNotACid'"), "{}", describe(&out));

    // A well-formed CID that nobody has: a timeout error, not a hang.
    let unknown = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let start = Instant::now();
    let out = kubelt(&node.repo, &["cat", unknown])?;
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not found") && stderr.contains(unknown), "{}", describe(&out));

    let (_, reply) = node.post_raw(r#"{"jsonrpc":"2.0","id":1,"method":"pin_add","params":{"cid":"zzz"}}"#, Some(node.secret()))?;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    Ok(())
}

#[test]
fn pins_protect_content_from_gc_and_car_files_round_trip_offline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("offline");
    kubelt_ok(&repo, &["init"])?;
    let kept = dir.path().join("kept.bin");
    let dropped = dir.path().join("dropped.bin");
    std::fs::write(&kept, pseudo_random(600_000, 4))?;
    std::fs::write(&dropped, pseudo_random(600_000, 5))?;
    let kept_cid = kubelt_ok(&repo, &["add", "-q", kept.to_str().unwrap_or_default()])?;
    let dropped_cid = kubelt_ok(&repo, &["add", "-q", "--no-pin", dropped.to_str().unwrap_or_default()])?;
    assert!(kubelt_ok(&repo, &["pin", "ls"])?.contains(&kept_cid));

    let gc = kubelt_ok(&repo, &["repo", "gc"])?;
    assert!(gc.starts_with("removed 4 blocks"), "{gc}");
    assert!(!kubelt(&repo, &["cat", &dropped_cid])?.status.success(), "unpinned content is gone");
    assert_eq!(kubelt(&repo, &["cat", &kept_cid])?.stdout, std::fs::read(&kept)?);

    // CAR export, then import into another repo.
    let car = kubelt(&repo, &["dag", "export", &kept_cid])?;
    assert!(car.status.success(), "{}", describe(&car));
    let car_path = dir.path().join("kept.car");
    std::fs::write(&car_path, &car.stdout)?;
    let other = dir.path().join("other");
    kubelt_ok(&other, &["init"])?;
    let imported = kubelt_ok(&other, &["dag", "import", car_path.to_str().unwrap_or_default()])?;
    assert!(imported.contains(&kept_cid), "{imported}");
    assert_eq!(kubelt(&other, &["cat", &kept_cid])?.stdout, std::fs::read(&kept)?);

    // A truncated CAR is refused and pins nothing.
    let third = dir.path().join("third");
    kubelt_ok(&third, &["init"])?;
    let truncated = dir.path().join("truncated.car");
    std::fs::write(&truncated, &car.stdout[..car.stdout.len() - 1000])?;
    let out = kubelt(&third, &["dag", "import", truncated.to_str().unwrap_or_default()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"), "{}", describe(&out));
    assert_eq!(kubelt_ok(&third, &["pin", "ls"])?, "");

    // A CAR whose block bytes were altered is refused.
    let mut corrupt = car.stdout.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let corrupt_path = dir.path().join("corrupt.car");
    std::fs::write(&corrupt_path, corrupt)?;
    let out = kubelt(&third, &["dag", "import", corrupt_path.to_str().unwrap_or_default()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hash mismatch"), "{}", describe(&out));
    assert_eq!(kubelt_ok(&third, &["pin", "ls"])?, "");
    Ok(())
}

/// A peer can serve a directory the importer never makes: an entry `evil` that is a symlink
/// to any path, then a directory `evil` holding a file. `kubelt get` must refuse it with a
/// clear error and write nothing through the symlink: offline, through the node's API, and
/// with the blocks fetched over the network.
#[test]
fn get_of_a_symlink_and_a_directory_of_one_name_writes_nothing_outside_the_output() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside)?;
    let (root, blocks) = symlink_and_directory_of_one_name(outside.as_os_str().as_bytes())?;
    let car = dir.path().join("hostile.car");
    std::fs::write(&car, car_of(root, &blocks)?)?;
    let root = root.to_string();

    let expect_refused = |repo: &Path, output: &str| -> anyhow::Result<()> {
        let output = dir.path().join(output);
        let out = kubelt(repo, &["get", &root, "-o", output.to_str().unwrap_or_default()])?;
        assert!(!out.status.success(), "get of a hostile directory succeeded: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("more than one entry named \"evil\""), "{}", describe(&out));
        let written: Vec<_> = std::fs::read_dir(&outside)?.flatten().map(|e| e.path()).collect();
        assert!(written.is_empty(), "get wrote outside its output: {written:?}");
        Ok(())
    };

    let repo = dir.path().join("server");
    kubelt_ok(&repo, &["init"])?;
    kubelt_ok(&repo, &["dag", "import", car.to_str().unwrap_or_default()])?;
    expect_refused(&repo, "offline")?;

    let server = TestNode::start_on(&repo, "server", &[])?;
    expect_refused(&server.repo, "through-the-api")?;

    let fetcher = TestNode::start(dir.path(), "fetcher", &["--peer", &server.tcp_addr()])?;
    common::wait_until("the fetcher to connect", Duration::from_secs(10), || {
        Ok(fetcher.connected_peers()?.contains(&server.peer_id))
    })?;
    expect_refused(&fetcher.repo, "over-the-network")?;
    Ok(())
}

#[test]
fn a_node_fetches_content_from_a_provider_it_finds_in_the_dht() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // holder - boot - fetcher in a line: holder and fetcher are DHT clients that keep one
    // connection (to boot), so only holder's provider record in the DHT can bring them together.
    let boot = TestNode::start(dir.path(), "boot", &["--bootstrap"])?;
    let holder = start_dht_client(dir.path(), "holder", &boot)?;
    let fetcher = start_dht_client(dir.path(), "fetcher", &boot)?;
    let file = dir.path().join("file.bin");
    let bytes = pseudo_random(1024 * 1024 + 5, 21);
    std::fs::write(&file, &bytes)?;
    let cid = kubelt_ok(&holder.repo, &["add", "-q", file.to_str().unwrap_or_default()])?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fetcher.connected_peers()?, vec![boot.peer_id.clone()], "before the fetch, fetcher knows only boot");
    assert_eq!(holder.connected_peers()?, vec![boot.peer_id.clone()]);

    let out = kubelt(&fetcher.repo, &["cat", &cid])?;
    assert!(out.status.success(), "{}\nlog of fetcher:\n{}", describe(&out), fetcher.log());
    assert!(out.stdout == bytes, "cat returned {} bytes, expected {}", out.stdout.len(), bytes.len());
    assert!(fetcher.connected_peers()?.contains(&holder.peer_id), "fetcher dialed the provider");
    // Every block came from holder; boot only pointed the way.
    assert_eq!(bitswap_stat(&boot, "blocks_sent")?, 0);
    assert_eq!(bitswap_stat(&boot, "blocks_received")?, 0);
    assert!(bitswap_stat(&holder, "blocks_sent")? >= 5, "1 MiB is 4 leaves and a root");
    Ok(())
}

#[test]
fn pin_add_direct_keeps_one_block_and_pin_rm_releases_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("n");
    kubelt_ok(&repo, &["init"])?;
    edit_config(&repo, "fetch_timeout_secs = 60", "fetch_timeout_secs = 2")?;
    let node = TestNode::start_on(&repo, "n", &[])?;
    let file = dir.path().join("file.bin");
    std::fs::write(&file, pseudo_random(600_000, 22))?;
    // 600,000 bytes: three 256 KiB leaves under one root.
    let cid = kubelt_ok(&repo, &["add", "-q", "--no-pin", file.to_str().unwrap_or_default()])?;

    assert_eq!(kubelt_ok(&repo, &["pin", "add", "--direct", &cid])?, format!("pinned {cid} direct"));
    assert_eq!(kubelt_ok(&repo, &["pin", "ls"])?, format!("{cid} direct"));
    let gc = kubelt_ok(&repo, &["repo", "gc"])?;
    assert!(gc.starts_with("removed 3 blocks, kept 1"), "a direct pin keeps the root only: {gc}");
    // A recursive pin now needs the leaves, which are gone (nobody else has them).
    let out = kubelt(&repo, &["pin", "add", &cid])?;
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(kubelt_ok(&repo, &["pin", "ls"])?, format!("{cid} direct"), "a failed pin changes nothing");

    assert_eq!(kubelt_ok(&repo, &["pin", "rm", &cid])?, format!("unpinned {cid}"));
    assert_eq!(kubelt_ok(&repo, &["pin", "ls"])?, "");
    assert!(kubelt_ok(&repo, &["repo", "gc"])?.starts_with("removed 1 blocks, kept 0"));
    let out = kubelt(&repo, &["pin", "rm", &cid])?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not pinned"), "{}", describe(&out));
    drop(node);
    Ok(())
}
