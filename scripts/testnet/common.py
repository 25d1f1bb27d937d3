"""What every scenario shares: the testnet's layout (as `scripts/testnet.sh up` left it), one
shell kept open in each container for cheap JSON-RPC calls and commands, the test core, waits
with deadlines that say what is missing, and percentiles.

Every check that fails raises `Failed` with a message saying what was expected and what was
seen; the runner (`__main__.py`) prints it in red and exits non-zero.

Timing: every stamp is taken on this host with `time.monotonic()` (one clock for all
containers), just before the request that showed a state, or just after the answer that
acknowledged a write.
"""
import json
import os
import select
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.kubelt_nodes import rpc_body, rpc_result

ROOT = Path(__file__).resolve().parents[2]
TN = ROOT / "testnet"
BUILD = TN / ".build"
STATE = BUILD / "state"
ENV_FILE = BUILD / "env"
PROJECT = "kubelt-testnet"
WALLET_KEY = TN / "test-wallet.key"
# The address of the key in test-wallet.key (Hardhat's well-known account #0): the test core.
OWNER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
NAMESPACE = "testnet"
WRITERS = ("node1", "node2")


def setting(name, default, kind=float):
    """A KUBELT_TESTNET_* setting from the environment."""
    return kind(os.environ.get(f"KUBELT_TESTNET_{name}", default))


TIMEOUT = setting("TIMEOUT", 60)


class Failed(Exception):
    """A check failed; the message says what was expected and what was seen."""


class Skipped(Exception):
    """A scenario that cannot run here (only outside CI: under CI it fails instead)."""


def strict():
    return os.environ.get("CI") == "true" or os.environ.get("KUBELT_TESTNET_STRICT") == "1"


class Results:
    """What the scenarios measured, one line each, for the summary at the end."""

    def __init__(self):
        self.lines = []

    def figure(self, line):
        print(f"\033[1;32m== {line}\033[0m", flush=True)
        self.lines.append(line)


def log(line):
    print(f"\033[1m==> {line}\033[0m", flush=True)


# ---------------------------------------------------------------------------------------------
# docker and docker-compose

def run(*cmd, check=True, timeout=300, **kw):
    """Runs a command; a failure raises `Failed` with its output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise Failed(f"`{' '.join(cmd)}` did not end in {timeout}s") from None
    if check and proc.returncode != 0:
        raise Failed(f"`{' '.join(cmd)}` exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def state():
    """What `up` wrote: the compose file and the number of nodes."""
    fields = {}
    if STATE.exists():
        fields = dict(line.split("=", 1) for line in STATE.read_text().split() if "=" in line)
    return fields


def compose(*args):
    compose_file = state().get("compose", str(TN / "docker-compose.yml"))
    return run("docker-compose", "-p", PROJECT, "-f", compose_file, "--env-file", str(ENV_FILE), *args)


def nodes():
    return [f"node{i}" for i in range(1, int(state().get("nodes", setting("NODES", 6, int))) + 1)]


def services():
    return ["bootstrap1", "bootstrap2", *nodes()]


def followers():
    return [s for s in nodes() if s not in WRITERS]


def ip_of(service):
    """Fixed addresses of testnet/gen-compose.sh."""
    if service.startswith("bootstrap"):
        return f"10.77.0.{int(service[-1]) + 1}"
    return f"10.77.1.{int(service[4:])}"


def running(service):
    proc = run("docker", "inspect", "-f", "{{ .State.Running }}", f"kt-{service}", check=False)
    return proc.stdout.strip() == "true"


def running_services():
    names = set(run("docker", "ps", "--format", "{{ .Names }}").stdout.split())
    return [s for s in services() if f"kt-{s}" in names]


def parallel(fn, items):
    """fn(item) for every item at once; {item: result}. The first exception is raised."""
    items = list(items)
    if not items:
        return {}
    with ThreadPoolExecutor(len(items)) as pool:
        futures = {item: pool.submit(fn, item) for item in items}
        return {item: f.result() for item, f in futures.items()}


# ---------------------------------------------------------------------------------------------
# one shell per container

# Runs in busybox sh inside a container; reads a verb line and an argument line, answers with
# the output and an end line carrying the exit code. `rpc` posts a JSON-RPC body to the node's
# API with busybox wget (URL and cookie read again after a failure: both are new at every
# start; no -T: it crashes busybox 1.35's wget, the caller times out instead); `sh` runs a
# shell command.
_SHELL = r'''
end=$1; url=""
while IFS= read -r verb && IFS= read -r arg; do
  case "$verb" in
    rpc)
      if [ -z "$url" ]; then url=$(cat /repo/api 2>/dev/null); auth="Authorization: Bearer $(cat /repo/api.cookie 2>/dev/null)"; fi
      wget -q -O - --header "$auth" --header "Content-Type: application/json" --post-data "$arg" "$url" 2>&1
      rc=$?; [ $rc -eq 0 ] || url="" ;;
    sh) sh -c "$arg" 2>&1; rc=$? ;;
    *) echo "unknown verb $verb"; rc=2 ;;
  esac
  printf '\n%s %s\n' "$end" "$rc"
done
'''
_END = "\x1ekubelt-testnet-end"


class Unanswered(Failed):
    """The container's shell or the node's API did not answer."""


class Shell:
    """A busybox shell kept open in one container (`docker exec -i`). A call through it costs a
    fork or two inside the container, where a `docker exec` per call costs ~0.1 s and a docker
    CLI process on this host: cheap enough to poll every node every 50 ms. Reopened when the
    container restarted (which ends it)."""

    def __init__(self, service):
        self.service = service
        self.lock = threading.Lock()
        self.proc = None
        self.buffer = b""

    def _open(self):
        self.proc = subprocess.Popen(
            ["docker", "exec", "-i", f"kt-{self.service}", "sh", "-c", _SHELL, "sh", _END],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.buffer = b""

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def exchange(self, verb, arg, timeout=TIMEOUT):
        """(exit code, output) of one request."""
        if "\n" in arg:
            raise ValueError("one line per argument")
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._open()
            try:
                self.proc.stdin.write(f"{verb}\n{arg}\n".encode())
                self.proc.stdin.flush()
                return self._answer(time.monotonic() + timeout)
            except (BrokenPipeError, Unanswered) as e:
                self.close()
                raise Unanswered(f"{self.service}: no answer ({e})") from None

    def _answer(self, deadline):
        fd = self.proc.stdout.fileno()
        marker = ("\n" + _END + " ").encode()
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                stop = self.buffer.find(b"\n", at + len(marker))
                if stop >= 0:
                    out, code = self.buffer[:at], self.buffer[at + len(marker):stop]
                    self.buffer = self.buffer[stop + 1:]
                    return int(code), out.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Unanswered("timed out")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise Unanswered(f"the shell ended: {self.buffer.decode(errors='replace').strip()[-300:]}")
            self.buffer += chunk

    def rpc(self, method, params=None, timeout=TIMEOUT):
        code, out = self.exchange("rpc", rpc_body(method, params), timeout)
        if code != 0:
            raise Unanswered(f"{self.service}: {method}: no answer from the API ({out.strip()})")
        try:
            reply = json.loads(out)
        except ValueError:
            raise Failed(f"{self.service}: {method}: not JSON: {out[:300]!r}") from None
        try:
            return rpc_result(method, reply)
        except RuntimeError as e:
            raise Failed(f"{self.service}: {e}") from None

    def sh(self, command, timeout=TIMEOUT, check=True):
        code, out = self.exchange("sh", command, timeout)
        if check and code != 0:
            raise Failed(f"{self.service}: `{command}` exited with {code}: {out.strip()}")
        return out


_shells = {}
_shells_lock = threading.Lock()


def shell(service):
    with _shells_lock:
        if service not in _shells:
            _shells[service] = Shell(service)
        return _shells[service]


def close_shells():
    for s in _shells.values():
        s.close()


def rpc(service, method, params=None, timeout=TIMEOUT):
    return shell(service).rpc(method, params, timeout)


def rpc_all(services_, method, params=None):
    return parallel(lambda s: rpc(s, method, params), services_)


# ---------------------------------------------------------------------------------------------
# waits and figures

def wait_until(what, timeout, check, interval=0.2):
    """Calls check() until it returns (True, _); returns the seconds it took as "4.37s±0.41"
    (an upper bound, ± the length of the last round, during which the state was reached). On
    timeout fails with what the last check() said was missing."""
    t0 = time.monotonic()
    while True:
        round_start = time.monotonic()
        try:
            ok, missing = check()
        except Failed as e:  # a node that does not answer yet is not there yet
            ok, missing = False, str(e)
        if ok:
            now = time.monotonic()
            return f"{now - t0:.2f}s±{now - round_start:.2f}"
        if time.monotonic() - t0 > timeout:
            raise Failed(f"{what} after {timeout:.0f}s; {missing}")
        time.sleep(interval)


def percentile(values, p):
    """Nearest-rank p-th percentile."""
    values = sorted(values)
    if not values:
        return float("nan")
    rank = max(1, min(len(values), -(-p * len(values) // 100)))
    return values[int(rank) - 1]


def wait_api(services_, timeout):
    def check():
        pending = {s: e for s, e in parallel(_unanswered, services_).items() if e}
        return not pending, "no API answer from: " + "; ".join(f"{s} ({e})" for s, e in pending.items())
    return wait_until("not every API answers", timeout, check, interval=0.5)


def _unanswered(service):
    """Why a node's API does not answer, or None when it does."""
    try:
        rpc(service, "node_id", timeout=10)
        return None
    except Failed as e:
        return str(e)


def peer_ids(services_):
    return {s: r["peer_id"] for s, r in rpc_all(services_, "node_id").items()}


# ---------------------------------------------------------------------------------------------
# the test core

def have_core():
    """Whether this kubelt has the `core` commands (asked once, of any running container)."""
    if not hasattr(have_core, "answer"):
        up = running_services()
        if not up:
            raise Failed("no testnet container is running")
        have_core.answer = shell(up[-1]).exchange("sh", "kubelt core --help >/dev/null 2>&1")[0] == 0
    return have_core.answer


def need_core():
    """A scenario that needs cores, on an image without them, is skipped (never passed), and
    under CI fails."""
    if have_core():
        return
    if strict():
        raise Failed("needs cores, and this image's kubelt has no 'core' command")
    raise Skipped("this kubelt has no 'core' command")


def test_core(listed):
    """The test core's entry in a `core_ls` answer, or None."""
    return next((c for c in listed if str(c.get("address", "")).lower() == OWNER.lower()), None)


def heads_of(listed):
    """The test core's heads, short and sorted: "none" before the first write, None when the
    node does not hold the core."""
    core = test_core(listed)
    if core is None:
        return None
    return ",".join(sorted(h[:8] for h in core.get("heads", []))) or "none"


def wait_same_heads(services_, timeout=TIMEOUT):
    def check():
        heads = {s: heads_of(r) for s, r in rpc_all(services_, "core_ls").items()}
        same = None not in heads.values() and len(set(heads.values())) == 1
        return same, "heads: " + ", ".join(f"{s} {h}" for s, h in heads.items())
    return wait_until("the nodes do not hold the same heads", timeout, check)


def core_keys(service, run_id):
    """The keys under NAMESPACE/run_id of the test core on a node."""
    value = rpc(service, "core_get", {"address": OWNER, "namespace": NAMESPACE, "path": run_id})
    return set(value) if isinstance(value, dict) else set()


def wait_keys_everywhere(services_, run_id, keys, timeout=TIMEOUT):
    keys = set(keys)

    def check():
        missing = {s: len(keys - got) for s, got in parallel(lambda s: core_keys(s, run_id), services_).items()}
        missing = {s: n for s, n in missing.items() if n}
        return not missing, "still missing writes (node: count): " + ", ".join(f"{s}: {n}" for s, n in missing.items())
    return wait_until(f"writes of {run_id} are missing", timeout, check)


def write(service, run_id, key, i):
    rpc(service, "core_set", {"address": OWNER, "namespace": NAMESPACE, "path": f"{run_id}/{key}", "value": {"i": i}})


def write_stream(writer, run_id, count, gap):
    """COUNT writes on WRITER, GAP seconds apart: {key: when acknowledged}."""
    acks = {}
    for i in range(count):
        key = f"{writer}-{i}"
        write(writer, run_id, key, i)
        acks[key] = time.monotonic()
        time.sleep(gap)
    return acks


def write_streams(writers, run_id, count, gap):
    acks = {}
    for stream in parallel(lambda w: write_stream(w, run_id, count, gap), writers).values():
        acks.update(stream)
    return acks


class Watchers:
    """A thread per node polling `core_get` of the run's subtree every ~50 ms
    (KUBELT_TESTNET_WATCH_INTERVAL), noting when each key first showed up (stamped just before
    the request that showed it)."""

    def __init__(self, services_, run_id):
        self.seen = {s: {} for s in services_}
        self.errors = []
        self.stop_flag = threading.Event()
        self.interval = setting("WATCH_INTERVAL", 0.05)
        self.threads = [threading.Thread(target=self._watch, args=(s, run_id), daemon=True) for s in services_]
        for t in self.threads:
            t.start()

    def _watch(self, service, run_id):
        seen = self.seen[service]
        while not self.stop_flag.is_set():
            stamp = time.monotonic()
            try:
                keys = core_keys(service, run_id)
            except Failed as e:
                self.errors.append(str(e))
                keys = set()
            for k in keys - seen.keys():
                seen[k] = stamp
            self.stop_flag.wait(self.interval)

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join()

    def wait_saw(self, keys, timeout=TIMEOUT):
        keys = set(keys)

        def check():
            behind = [s for s, seen in self.seen.items() if not keys <= seen.keys()]
            return not behind, f"still behind: {' '.join(behind)}; last errors: {self.errors[-3:]}"
        wait_until("the watchers did not see every write", timeout, check, interval=0.1)

    def all_seen_at(self, service, keys):
        return max(self.seen[service][k] for k in keys)
