"""content: a random file added on node1 is read with `kubelt cat` on the node farthest from it
(one it has no connection to, when there is one), across the docker network: the bytes must
be identical. Prints the add and transfer times (the Rust tests check content on loopback)."""
import os
import subprocess
import tempfile
import time

from .common import Failed, nodes, rpc, run, setting

MIB = 1024 * 1024


def run_scenario(results):
    mb = setting("CONTENT_MB", 8, int)
    src = "node1"
    src_id = rpc(src, "node_id")["peer_id"]
    dst, how = None, f"not connected to {src}"
    for s in reversed(nodes()):
        if s != src and all(p["peer_id"] != src_id for p in rpc(s, "swarm_peers")):
            dst = s
            break
    if dst is None:
        dst, how = nodes()[-1], f"connected to {src}, as every node is"
    data = os.urandom(mb * MIB)
    with tempfile.TemporaryDirectory(prefix="kubelt-testnet-") as tmp:
        path = os.path.join(tmp, "content.bin")
        with open(path, "wb") as f:
            f.write(data)
        run("docker", "cp", path, f"kt-{src}:/tmp/content.bin")
    t0 = time.monotonic()
    cid = rpc(src, "content_add", {"path": "/tmp/content.bin"})["cid"]
    add_s = time.monotonic() - t0
    run("docker", "exec", f"kt-{src}", "rm", "-f", "/tmp/content.bin")
    t0 = time.monotonic()
    got = subprocess.run(["docker", "exec", f"kt-{dst}", "kubelt", "cat", cid], capture_output=True, timeout=300)
    cat_s = time.monotonic() - t0
    if got.returncode != 0:
        raise Failed(f"`kubelt cat {cid}` on {dst} exited with {got.returncode}: {got.stderr.decode(errors='replace').strip()}")
    if got.stdout != data:
        raise Failed(f"the bytes {dst} read differ from what {src} added ({len(got.stdout)} of {len(data)} bytes)")
    results.figure(f"content: {mb} MiB added on {src} in {add_s:.2f}s ({cid}); cat on {dst} ({how}) took {cat_s:.2f}s "
                   f"({mb / cat_s:.1f} MiB/s, docker exec included), bytes identical")
