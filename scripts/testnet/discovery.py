"""discovery: every node finds every other through the DHT over the docker network, and a
fresh node (new key, empty repo) joins. The Rust tests check that nodes find each other (in one
process, and as processes on loopback); this times it across containers that were told only
the bootstraps' addresses.
"""
import statistics
import time
from datetime import datetime

from .common import Failed, TIMEOUT, compose, nodes, parallel, peer_ids, rpc, rpc_all, running, run, services, \
    wait_api, wait_until, PROJECT, have_core
from .status import setup_core


def routing_tables(services_):
    return {s: {p["peer_id"] for p in table} for s, table in rpc_all(services_, "dht_routingTable").items()}


def started_at(service):
    """When docker started the container (seconds since the epoch)."""
    stamp = run("docker", "inspect", "-f", "{{ .State.StartedAt }}", f"kt-{service}").stdout.strip()
    # Docker gives nanoseconds and a Z; fromisoformat takes microseconds and an offset.
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def run_scenario(results):
    all_ = services()
    ids = peer_ids(all_)
    if len(set(ids.values())) != len(all_):
        raise Failed(f"the nodes do not have {len(all_)} distinct peer ids: {ids}")
    last_start = max(parallel(started_at, all_).values())
    first_check = time.time()

    def everyone_known():
        tables = routing_tables(all_)
        lacking = {s: len(set(ids.values()) - {ids[s]} - tables[s]) for s in all_}
        lacking = {s: n for s, n in lacking.items() if n}
        return not lacking, "routing tables still missing peers (node: count): " + ", ".join(f"{s}: {n}" for s, n in lacking.items())
    wait_until("not every node has every other in its routing table", 2 * TIMEOUT, everyone_known, interval=0.5)
    complete = time.time()
    connected = sorted(r["connected_peers"] for r in rpc_all(all_, "node_status").values())
    results.figure(
        f"discovery: all {len(all_)} nodes have all {len(all_) - 1} others in their routing tables, "
        f"{complete - last_start:.2f}s after the last container start (first check at {first_check - last_start:.2f}s); "
        f"connected peers per node: min {connected[0]}, mean {statistics.mean(connected):.1f}, max {connected[-1]}")

    # A node joins with a new identity.
    joiner = nodes()[-1]
    old_id = ids[joiner]
    others = {s: ids[s] for s in all_ if s != joiner}
    compose("rm", "-s", "-f", joiner)
    if running(joiner):
        raise Failed(f"{joiner} still runs after its removal")
    run("docker", "volume", "rm", f"{PROJECT}_{joiner}")
    t0 = time.monotonic()
    compose("up", "-d", "--no-deps", joiner)
    wait_api([joiner], 60)
    t_api = time.monotonic() - t0
    new_id = rpc(joiner, "node_id")["peer_id"]
    if new_id == old_id:
        raise Failed(f"{joiner} is not a fresh node (same peer id {new_id})")
    times = {}

    def joined():
        tables = routing_tables(all_)
        now = time.monotonic() - t0
        if "knows all" not in times and set(others.values()) <= tables[joiner]:
            times["knows all"] = now
        unaware = [s for s in others if new_id not in tables[s]]
        if "known by all" not in times and not unaware:
            times["known by all"] = now
        return len(times) == 2, f"the new {joiner} ({new_id}) knows all: {'knows all' in times}; not known by: {' '.join(unaware)}"
    wait_until("the fresh node did not join", 2 * TIMEOUT, joined, interval=0.25)
    if have_core():
        setup_core(quiet=True)
    results.figure(
        f"discovery: a fresh {joiner} (new key, empty repo) started; API up in {t_api:.2f}s, it had all "
        f"{len(others)} others in its routing table after {times['knows all']:.2f}s, and all of them had it after "
        f"{times['known by all']:.2f}s")
