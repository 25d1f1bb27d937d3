"""Issue 3 benchmarks: time from `kubelt run` to the first connected peer, and the resident
memory of a node idle for 60 s with 5 peers."""
import statistics, sys, tempfile, time
from kubelt_nodes import Node

IDLE_SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
ROUNDS = 5

with tempfile.TemporaryDirectory(prefix="kubelt-bench-") as root:
    boot = Node(root, "bootstrap", ["--bootstrap"])
    times = []
    for i in range(ROUNDS):
        node = Node(root, f"startup{i}", ["--peer", boot.tcp_addr()])
        while not node.call("swarm_peers"):
            time.sleep(0.002)
        times.append((time.monotonic() - node.started) * 1000)
        node.stop()
    print(f"run -> first connected peer: median {statistics.median(times):.0f} ms "
          f"(min {min(times):.0f}, max {max(times):.0f}, {ROUNDS} runs; includes process start and DB open)")

    nodes = [Node(root, f"idle{i}", ["--peer", boot.tcp_addr()]) for i in range(6)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(len(n.call("swarm_peers")) < 5 for n in nodes):
        time.sleep(0.5)
    peers = [len(n.call("swarm_peers")) for n in nodes]
    time.sleep(IDLE_SECS)
    rss = [n.rss_kb() / 1024 for n in nodes]
    print(f"idle node RSS after {IDLE_SECS} s with {min(peers)}-{max(peers)} peers: "
          f"median {statistics.median(rss):.1f} MB, max {max(rss):.1f} MB (goal < 40 MB); "
          f"bootstrap {boot.rss_kb() / 1024:.1f} MB")
    for n in nodes + [boot]:
        n.stop()
