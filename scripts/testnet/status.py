"""The parts of the lifecycle that read the nodes' answers: waiting until a started testnet is
ready and giving it the test core (end of `up`), the `status` table and the `mem` table.
`scripts/testnet.sh` does the rest (image, compose, logs, down)."""
import collections
import json
from pathlib import Path

from .common import Failed, OWNER, WALLET_KEY, WRITERS, have_core, heads_of, log, nodes, parallel, rpc, \
    run, running_services, services, shell, test_core, wait_api, wait_until


def setup_core(quiet=False):
    """Gives node1 and node2 a delegation for the test core (signed with the test wallet) and has
    every other node follow it. Idempotent: nodes that already hold the core are left alone."""
    for s, listed in parallel(lambda s: rpc(s, "core_ls"), nodes()).items():
        core = test_core(listed)
        if s in WRITERS:
            if core and core.get("writable"):
                continue
            log(f"{s}: delegation from the test wallet, signed and submitted")
            sh = shell(s)
            sh.sh(f"kubelt core delegate {OWNER} --namespaces '*' --expires 30d >/tmp/delegation.txt")
            run("docker", "cp", str(WALLET_KEY), f"kt-{s}:/tmp/wallet.key")
            sh.sh("kubelt core submit --message-file /tmp/delegation.txt --sign-with /tmp/wallet.key; "
                  "rc=$?; rm -f /tmp/wallet.key; exit $rc")
        elif core is None:
            rpc(s, "core_follow", {"address": OWNER})
    if not quiet:
        log(f"test core {OWNER}: writers {' '.join(WRITERS)}, followed by the others")


def ready():
    """After `docker-compose up`: every API answers, every node has a peer, the test core is set up."""
    all_ = services()
    log(f"every API answers after {wait_api(all_, 120)}; waiting for every node to have a peer")

    def connected():
        lonely = [s for s, st in parallel(lambda s: rpc(s, "node_status"), all_).items() if not st.get("connected_peers")]
        return not lonely, f"still without peers: {' '.join(lonely)}"
    wait_until("not every node found a peer", 120, connected, interval=1)
    if have_core():
        setup_core()
    else:
        log("!! this kubelt has no 'core' command: the test core is not set up")
    status()


def _ask(service):
    """(node_status, core_ls or None), or the error as text."""
    try:
        return rpc(service, "node_status"), rpc(service, "core_ls") if have_core() else None
    except Failed as e:
        return str(e)


def status():
    up = running_services()
    answers = parallel(_ask, up) if up else {}
    heads = {s: heads_of(a[1]) for s, a in answers.items() if isinstance(a, tuple) and a[1] is not None}
    # The most common heads among the nodes holding the core count as "the" heads.
    counted = collections.Counter(h for h in heads.values() if h)
    majority = counted.most_common(1)[0][0] if counted else None
    row = "{:<11} {:<54} {:>5} {:>5} {:<20} {}"
    print(row.format("NODE", "PEER ID", "PEERS", "CORES", "HEADS", "IN SYNC"))
    for s in services():
        answer = answers.get(s)
        if answer is None:
            print(row.format(s, "(container not running)", "-", "-", "-", "-"))
        elif isinstance(answer, str):
            print(row.format(s, "(no answer from its API)", "-", "-", "-", "-"))
        else:
            st, listed = answer
            cores = "-" if listed is None else len(listed)
            h = heads.get(s)
            sync = "-" if not h else "yes" if h == majority else "NO"
            print(row.format(s, st.get("peer_id", "?"), st.get("connected_peers", "?"), cores, (h or "-")[:20], sync))


def _mib(text):
    """docker stats sizes ("12.5MiB", "1.2GiB", "800KiB", "3kB") in MiB."""
    units = {"GiB": 1024, "MiB": 1, "KiB": 1 / 1024, "GB": 1e9 / 2**20, "MB": 1e6 / 2**20, "kB": 1e3 / 2**20, "B": 1 / 2**20}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    return float(text) / 2**20


def mem():
    """Memory of each container now (`docker stats`, page cache excluded) and, where the cgroup v1
    files are readable, its peak since it started (page cache included). Returns the summary line."""
    names = [f"kt-{s}" for s in running_services()]
    if not names:
        raise Failed("no testnet container is running")
    stats = [json.loads(line) for line in run("docker", "stats", "--no-stream", "--format", "{{ json . }}", *names).stdout.splitlines()]
    ids = dict(line.split() for line in run("docker", "inspect", "-f", "{{ .Name }} {{ .Id }}", *names).stdout.splitlines())
    print(f"{'CONTAINER':<16} {'MEMORY':>10} {'CPU':>8} {'PEAK (w/ cache)':>16}")
    mems, peaks = [], []
    for st in stats:
        used = _mib(st["MemUsage"].split("/")[0].strip())
        peak_file = Path(f"/sys/fs/cgroup/memory/docker/{ids.get('/' + st['Name'], '')}/memory.max_usage_in_bytes")
        peak = int(peak_file.read_text()) / 2**20 if peak_file.is_file() else None
        mems.append(used)
        if peak is not None:
            peaks.append(peak)
        print(f"{st['Name']:<16} {used:6.1f} MiB {st['CPUPerc']:>8} {f'{peak:.1f} MiB' if peak is not None else '-':>16}")
    line = (f"memory: {len(mems)} containers, total {sum(mems):.0f} MiB, mean {sum(mems) / len(mems):.1f} MiB, "
            f"min {min(mems):.1f} MiB, max {max(mems):.1f} MiB")
    if peaks:
        line += f"; highest peak (page cache included) {max(peaks):.1f} MiB"
    print(line)
    return line

