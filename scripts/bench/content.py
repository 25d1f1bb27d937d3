"""Issue 4 benchmarks, side by side with Kubo in one run (loopback only; run inside a private
network namespace by bench.sh).

add:       100 MiB `kubelt add` (offline, fresh repo) vs Kubo `add` and iroh's sendme import, medians
           of alternating rounds.
transfer:  100 MiB kubelt->kubelt over QUIC and over TCP, Kubo->Kubo, Kubo->kubelt, kubelt->Kubo;
           iroh's sendme and rust-libp2p's perf protocol (`libp2p-perf`: bare noise+yamux or QUIC,
           no content addressing) on the same loopback, where installed; each the median of
           KUBELT_BENCH_ROUNDS rounds (default 3), every transfer once per round.
memory:    peak RSS of a kubelt node fetching 1 GiB from another kubelt node.
"""
import json, os, shutil, subprocess, sys, tempfile, time
from kubelt_nodes import Node, BIN
from kubo import Kubo

MIB = 1024 * 1024
SIZE = int(os.environ.get("KUBELT_BENCH_MIB", "100")) * MIB
BIG = int(os.environ.get("KUBELT_BENCH_BIG_MIB", "1024")) * MIB
what = sys.argv[1:] or ["add", "transfer", "memory"]
results = []


def report(name, seconds, size, baseline=None):
    rate = size / seconds / 1e6
    line = f"{name:<34} {seconds:7.3f} s {rate:9.1f} MB/s"
    if baseline:
        line += f"   {rate / baseline:5.2f}x baseline"
    print(line, flush=True)
    return rate


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n


def settle():
    """Writes every dirty page back before a timed step, so that no step pays for the
    writeback of an earlier one's files (the test file, a fetched copy): the disk is the
    limit of `add` here, and the kernel starts writing dirty pages back 30 s after they were
    written, in the middle of whatever runs then."""
    os.sync()


def sendme(data, root, receive=True):
    """iroh's sendme, relay disabled: (import seconds, transfer seconds), or None if missing.
    The import is the time from its start to its ticket; without `receive`, the transfer is
    not made (None)."""
    if not shutil.which("sendme"):
        return None
    work = tempfile.mkdtemp(dir=root)
    settle()
    start = time.monotonic()
    sender = subprocess.Popen(["sendme", "send", "--relay", "disabled", "--ticket-type", "addresses", "--no-progress", data],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    ticket = None
    for line in sender.stdout:
        if "sendme receive" in line:
            ticket = line.split()[-1]
            break
    imported = time.monotonic() - start
    transferred = None
    if receive:
        settle()
        start = time.monotonic()
        subprocess.run(["sendme", "receive", "--relay", "disabled", "--no-progress", ticket], cwd=work, check=True, capture_output=True)
        transferred = time.monotonic() - start
    sender.kill()
    sender.wait()
    shutil.rmtree(work, ignore_errors=True)
    return imported, transferred


# rust-libp2p's perf binary (`cargo install --root /opt/libp2p-perf libp2p-perf`: its binary is
# called `perf`, so it is kept off the PATH where Linux's perf lives). LIBP2P_PERF overrides.
LIBP2P_PERF = os.environ.get("LIBP2P_PERF", "/opt/libp2p-perf/bin/perf")


def libp2p_perf(transport, port):
    """Seconds for rust-libp2p's perf client to download SIZE bytes over `transport` (tcp or
    quic-v1) from its server on loopback, or None where libp2p-perf is not installed."""
    if not os.access(LIBP2P_PERF, os.X_OK):
        return None
    server = subprocess.Popen([LIBP2P_PERF, "--run-server", "--server-address", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        out = subprocess.run([LIBP2P_PERF, "--server-address", f"127.0.0.1:{port}", "--transport", transport,
                              "--upload-bytes", "0", "--download-bytes", str(SIZE)],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    finally:
        server.kill()
        server.wait()
    # The client prints one JSON object per line; the last one is the whole run.
    result = json.loads(out.strip().splitlines()[-1])
    seconds = result.get("timeSeconds") or result.get("downloadSeconds") or result.get("DownloadSeconds")
    if seconds is None:
        raise RuntimeError(f"unexpected libp2p-perf output: {out[-500:]}")
    return float(seconds)


def median(xs):
    return sorted(xs)[len(xs) // 2]


def kubelt_cat(node, cid):
    settle()
    start = time.monotonic()
    subprocess.run([BIN, "--repo", node.repo, "cat", cid], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


with tempfile.TemporaryDirectory(prefix="kubelt-bench-", dir="/var/tmp") as root:
    data = os.path.join(root, "data.bin")
    random_file(data, SIZE)
    subprocess.run(["cat", data], stdout=subprocess.DEVNULL)  # warm the page cache for both

    if "add" in what:
        rounds = int(os.environ.get("KUBELT_BENCH_ROUNDS", "3"))
        print(f"-- add {SIZE // MIB} MiB, median of {rounds} alternating rounds")
        # Kubo, kubelt and sendme's import take turns in every round; each line is the median.
        kubo_times, our_times, iroh_times = [], [], []
        for i in range(rounds):
            kubo = Kubo()
            settle()
            start = time.monotonic(); kubo_cid = kubo.add(data); kubo_times.append(time.monotonic() - start)
            kubo.quit()
            repo = os.path.join(root, f"add-repo-{i}")
            subprocess.run([BIN, "--repo", repo, "init"], check=True, capture_output=True)
            settle()
            start = time.monotonic()
            cid = subprocess.run([BIN, "--repo", repo, "add", "-q", data], check=True, capture_output=True, text=True).stdout.strip()
            our_times.append(time.monotonic() - start)
            shutil.rmtree(repo)
            iroh = sendme(data, root, receive=False)
            if iroh:
                iroh_times.append(iroh[0])
        every = lambda xs: ', '.join(f'{t:.3f}' for t in xs)
        base = report("Kubo add", median(kubo_times), SIZE)
        report("kubelt add (process, fresh repo)", median(our_times), SIZE, base)
        print(f"   (goal >= 3x Kubo; every round: Kubo {every(kubo_times)} s, kubelt {every(our_times)} s)")
        print(f"same CID: {cid == kubo_cid} ({cid})")
        if iroh_times:
            report("sendme import (to ticket)", median(iroh_times), SIZE, base)
            print(f"   kubelt add takes {median(our_times) / median(iroh_times):.2f}x sendme's import "
                  f"(goal <= 1.5x; every round: sendme {every(iroh_times)} s)")

    if "transfer" in what:
        # Every transfer of a round runs once, the rounds one after the other, and each line is
        # the median over the rounds: a single 100 MiB transfer takes under half a second here,
        # and one run moved the ratios by a third.
        rounds = int(os.environ.get("KUBELT_BENCH_ROUNDS", "3"))
        print(f"-- transfer {SIZE // MIB} MiB over loopback, median of {rounds} alternating rounds")
        times = {}
        timed = lambda name, seconds: times.setdefault(name, []).append(seconds)
        transports = [("/quic-v1", "quic-v1", 4931), ("/tcp/", "tcp", 4932)]
        k1 = Kubo()
        kcid = k1.add(data)
        a = Node(root, "a")
        subprocess.run([BIN, "--repo", a.repo, "add", "-q", data], check=True, capture_output=True)
        for i in range(rounds):
            k2 = Kubo()
            assert k2.connect(k1.addr())
            settle()
            start = time.monotonic(); ok = k2.get(kcid, os.path.join(root, f"k2-{i}.out")); timed("kubo", time.monotonic() - start)
            assert ok
            k2.quit()
            iroh = sendme(data, root)
            if iroh:
                timed("sendme", iroh[1])
            for transport, perf_transport, port in transports:
                name = transport.strip('/')
                perf = libp2p_perf(perf_transport, port)
                if perf:
                    timed(f"perf {name}", perf)
                b = Node(root, f"b{name.replace('/', '')}-{i}")
                b.call("swarm_connect", {"addr": next(x for x in a.addresses if transport in x)})
                timed(f"kubelt {name}", kubelt_cat(b, kcid))
                b.stop()
            c = Node(root, f"c-{i}")
            c.call("swarm_connect", {"addr": k1.addr()})
            timed("kubo -> kubelt", kubelt_cat(c, kcid))
            c.stop()
            k3 = Kubo()
            assert k3.connect(a.tcp_addr())
            settle()
            start = time.monotonic(); ok = k3.get(kcid, os.path.join(root, f"k3-{i}.out")); timed("kubelt -> kubo", time.monotonic() - start)
            assert ok
            k3.quit()
        k1.quit(); a.stop()
        line = lambda name, key, base=None: report(name, median(times[key]), SIZE, base) if key in times else None
        base = line("Kubo -> Kubo", "kubo")
        iroh_rate = line("sendme -> sendme (iroh, QUIC)", "sendme", base)
        for transport, _, _ in transports:
            name = transport.strip('/')
            perf_rate = line(f"libp2p-perf ({name})", f"perf {name}", base)
            rate = line(f"kubelt -> kubelt ({name})", f"kubelt {name}", base)
            if perf_rate:
                print(f"   kubelt/libp2p-perf over {name}: {rate / perf_rate:.2f}x (goal >= 0.8x)")
            if iroh_rate:
                print(f"   kubelt/sendme over {name}: {rate / iroh_rate:.2f}x (goal >= 1.3x)")
        line("Kubo -> kubelt", "kubo -> kubelt", base)
        print("   (goal: Kubo -> kubelt >= 4x Kubo -> Kubo)")
        line("kubelt -> Kubo", "kubelt -> kubo", base)
        for key, xs in times.items():
            print(f"   every round, {key}: {', '.join(f'{t:.3f}' for t in xs)} s")

    if "memory" in what:
        print(f"-- peak RSS fetching {BIG // MIB} MiB")
        big = os.path.join(root, "big.bin")
        random_file(big, BIG)
        os.remove(data)
        a = Node(root, "big-a")
        cid = subprocess.run([BIN, "--repo", a.repo, "add", "-q", big], check=True, capture_output=True, text=True).stdout.strip()
        os.remove(big)
        b = Node(root, "big-b")
        b.call("swarm_connect", {"addr": a.quic_addr()})
        t = kubelt_cat(b, cid)
        report("kubelt -> kubelt 1 GiB (quic)", t, BIG)
        print(f"peak RSS of the fetching node: {b.hwm_kb() / 1024:.1f} MB (goal < 150 MB); serving node: {a.hwm_kb() / 1024:.1f} MB")
        a.stop(); b.stop()
