"""partition: a cut cable between two halves of the network, both halves writing, then the heal.

Every packet between the halves is routed into a blackhole inside each container: nothing
arrives and nobody is told, so the nodes must notice dead connections themselves (ping) and
redial after the heal. protocol/tests/partition.rs cuts a network in one process by blocking
peers, which closes connections cleanly; this is the case it cannot show, timed on real
containers. Each half must converge on its own writes and hold none of the other half's until
the heal; after it, every node must hold every write and the same heads.
"""
import time

from .common import Failed, WRITERS, Watchers, core_keys, ip_of, nodes, need_core, parallel, \
    percentile, setting, shell, wait_keys_everywhere, wait_same_heads, write_streams


def halves():
    """(bootstrap1, node1, node3, ... | bootstrap2, node2, ...): a bootstrap and a writer each."""
    rest = [s for s in nodes() if s not in WRITERS]
    half = (len(rest) + 1) // 2
    return ["bootstrap1", WRITERS[0], *rest[:half]], ["bootstrap2", WRITERS[1], *rest[half:]]


def routes(verb, side_a, side_b):
    """Adds or deletes blackhole routes to the other side in every container at once (through the
    open shells: all within a few ms). Deleting ignores routes that are not there. Returns when
    it started."""
    start = time.monotonic()

    def apply(s):
        other = side_b if s in side_a else side_a
        ips = " ".join(ip_of(t) for t in other)
        if verb == "del":
            shell(s).sh(f"for ip in {ips}; do ip route del blackhole $ip/32 2>/dev/null; done; true")
        else:
            try:
                shell(s).sh(f"for ip in {ips}; do ip route add blackhole $ip/32 || exit 1; done")
            except Failed as e:
                raise Failed(f"cannot add routes (does the container have NET_ADMIN?): {e}") from None
    parallel(apply, side_a + side_b)
    return start


def leaks(side, foreign_writer, run_id):
    """Nodes of SIDE that hold a write of the other side's writer."""
    return [s for s, keys in parallel(lambda s: core_keys(s, run_id), side).items()
            if any(k.startswith(f"{foreign_writer}-") for k in keys)]


def run_scenario(results):
    need_core()
    writes = setting("WRITES", 20, int)
    hold = setting("PARTITION_SECS", 15)
    side_a, side_b = halves()
    nodes_a = [s for s in side_a if s.startswith("node")]
    nodes_b = [s for s in side_b if s.startswith("node")]
    run_id = f"p{int(time.time())}"
    wait_same_heads(nodes())
    print(f"partition: side A = {' '.join(side_a)} | side B = {' '.join(side_b)}", flush=True)
    watchers = None
    try:
        t_cut = routes("add", side_a, side_b)
        acks = write_streams(WRITERS, run_id, writes, 0.05)
        keys_a = {k for k in acks if k.startswith(f"{WRITERS[0]}-")}
        keys_b = set(acks) - keys_a
        t_a = wait_keys_everywhere(nodes_a, run_id, keys_a)
        t_b = wait_keys_everywhere(nodes_b, run_id, keys_b)
        # Watch every node from before the heal to the moment it holds every write.
        watchers = Watchers(nodes(), run_id)
        time.sleep(max(1.0, hold - (time.monotonic() - t_cut)))
        # Checked at the end of the cut: nothing crossed during all of it.
        crossed = leaks(nodes_a, WRITERS[1], run_id) + leaks(nodes_b, WRITERS[0], run_id)
        if crossed:
            raise Failed(f"writes crossed the partition to: {' '.join(crossed)}")
        t_heal = routes("del", side_a, side_b)
        healed_in = time.monotonic() - t_heal
        watchers.wait_saw(acks.keys())
    finally:
        if watchers:
            watchers.stop()
        try:
            routes("del", side_a, side_b)
        except Failed as e:
            print(f"partition: could not remove every blackhole route: {e}", flush=True)
    per_node = [watchers.all_seen_at(s, acks) - t_heal for s in nodes()]
    t_keys = wait_keys_everywhere(nodes(), run_id, acks)
    wait_same_heads(nodes())
    t_same = time.monotonic() - t_heal
    results.figure(
        f"partition: {len(acks)} writes ({writes} per side) during a {t_heal - t_cut:.2f}s partition; each side converged "
        f"alone ({t_a} / {t_b}), nothing crossed; healing (removing the routes everywhere) took {healed_in:.2f}s; from its "
        f"start every node held every write in {max(per_node):.2f}s (per node: p50 {percentile(per_node, 50):.2f}s, max "
        f"{max(per_node):.2f}s; checked again {t_keys}); the same heads on every node confirmed by a check that ended "
        f"{t_same:.2f}s after it")

