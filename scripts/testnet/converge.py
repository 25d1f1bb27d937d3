"""converge: node1 and node2 write at the same time; every follower is watched (a `core_get`
every ~50 ms) to time when each write reaches it. Every node must end with every write and the
same heads. Prints propagation p50/p99/max over every (write, follower) pair, acknowledged on
the writer to first seen on the follower, across containers (protocol/benches/core_sync.rs
measures the same in one process)."""
import time

from .common import WRITERS, Watchers, followers, need_core, nodes, percentile, setting, wait_keys_everywhere, \
    wait_same_heads, write_streams


def propagation(acks, watchers, watched):
    """Seconds from acknowledgement to first sight, for every (write, watched node) pair."""
    return [watchers.seen[s][k] - acks[k] for s in watched for k in acks]


def spread(values):
    return f"p50 {percentile(values, 50):.3f}s, p99 {percentile(values, 99):.3f}s, max {max(values):.3f}s"


def run_scenario(results):
    need_core()
    writes = setting("WRITES", 20, int)
    gap = setting("WRITE_GAP", 0.15)
    run_id = f"c{int(time.time())}"
    wait_same_heads(nodes())
    watched = followers()
    watchers = Watchers(watched, run_id)
    try:
        time.sleep(1)
        acks = write_streams(WRITERS, run_id, writes, gap)
        watchers.wait_saw(acks.keys())
    finally:
        watchers.stop()
    all_seen = max(watchers.all_seen_at(s, acks) for s in watched)
    # The watchers saw it; check it again independently, and the heads.
    t_keys = wait_keys_everywhere(nodes(), run_id, acks)
    t_heads = wait_same_heads(nodes())
    lat = propagation(acks, watchers, watched)
    results.figure(f"converge propagation over {len(lat)} (write, follower) pairs ({len(acks)} writes x {len(watched)} "
                   f"followers; ~50 ms sampling): {spread(lat)}")
    results.figure(f"converge: {len(acks)} writes ({' and '.join(WRITERS)} at once, {writes} each, {gap}s apart): every "
                   f"follower held all of them {all_seen - max(acks.values()):.2f}s after the last acknowledgement; "
                   f"checked again on all {len(nodes())} nodes ({t_keys}) and same heads everywhere ({t_heads})")
