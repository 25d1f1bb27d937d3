"""python3 -m testnet (from scripts/; scripts/testnet.sh runs it):

  ready               wait for a started testnet, set up the test core, print `status`
  status              table: node, peer id, peers, cores, heads, in sync
  mem                 memory of each container
  scenario NAME...    discovery | content | converge | partition | all

Each scenario prints its figures; a failed check prints FAIL in red and the exit status is 1.
"""
import sys
import time
import traceback

from . import content, converge, discovery, partition
from .common import Failed, Results, Skipped, close_shells, log, nodes, running, strict
from .status import mem, ready, status

SCENARIOS = {"discovery": discovery, "content": content, "converge": converge, "partition": partition}
# Scenarios of the bash script that only repeated Rust tests (kept here so that asking for one
# says where it went).
DROPPED = {
    "kill": "node/tests/cores.rs an_acknowledged_write_survives_kill_9 and node/tests/durability.rs "
            "(fsync before the acknowledgement, which a kill cannot show)",
    "bootstrap-loss": "node/tests/cluster.rs nodes_find_each_other_through_kademlia_and_survive_losing_the_bootstrap "
                      "and node/tests/cores.rs a_partition_heals_with_no_manual_step",
}


def fail(message):
    print(f"\033[1;31mFAIL: {message}\033[0m", file=sys.stderr, flush=True)


def warn(message):
    print(f"\033[1;33m!! {message}\033[0m", file=sys.stderr, flush=True)


def scenarios(names):
    if names == ["all"]:
        names = list(SCENARIOS)
    for name in names:
        if name in DROPPED:
            fail(f"scenario {name} was dropped: it repeated {DROPPED[name]}")
            return 2
        if name not in SCENARIOS:
            fail(f"unknown scenario {name} ({', '.join(SCENARIOS)}, all)")
            return 2
    if not names:
        fail(f"scenario NAME: {', '.join(SCENARIOS)}, all")
        return 2
    if not running("node1"):
        fail("the testnet is not running (scripts/testnet.sh up)")
        return 1
    results, failed, skipped = Results(), [], []
    for name in names:
        log(f"scenario {name} ({len(nodes())} nodes + 2 bootstraps)")
        t0 = time.monotonic()
        try:
            SCENARIOS[name].run_scenario(results)
        except Failed as e:
            fail(f"{name}: {e}")
            failed.append(name)
            results.lines.append(f"FAILED {name}: {e}")
        except Skipped as e:
            warn(f"SKIPPED {name}: {e}")
            skipped.append(name)
            results.lines.append(f"SKIPPED {name}: {e}")
        except Exception:  # a bug in the scenario is a failure too, with its traceback
            traceback.print_exc()
            fail(f"scenario {name} crashed")
            failed.append(name)
            results.lines.append(f"FAILED {name}: crashed")
        log(f"scenario {name} took {time.monotonic() - t0:.0f}s")
    if len(names) > 1:
        log("memory after the scenarios")
        results.lines.append(mem())
        log(f"summary ({len(nodes())} nodes + 2 bootstraps)")
        print("\n".join(results.lines))
    if failed:
        fail(f"scenarios failed: {' '.join(failed)}")
        return 1
    if skipped:
        warn("scenarios passed, but some were SKIPPED (see above): this run did not check everything")
        return 1 if strict() else 0
    log("every scenario passed")
    return 0


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "scenario":
            return scenarios(args)
        if cmd in ("ready", "status", "mem") and not args:
            {"ready": ready, "status": status, "mem": mem}[cmd]()
            return 0
        fail(f"unknown command: {' '.join(argv)}")
        return 2
    except Failed as e:
        fail(str(e))
        return 1
    finally:
        close_shells()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
