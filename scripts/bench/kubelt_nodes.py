"""Start and drive local `kubelt` processes for the benchmarks (loopback only)."""
import json, os, signal, subprocess, time, urllib.request

BIN = os.environ.get("KUBELT_BIN", "/var/tmp/kubelt-target/release/kubelt")


def rpc_body(method, params=None):
    """A JSON-RPC 2.0 request for the node's admin API (also used by scripts/testnet/)."""
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})


def rpc_result(method, reply):
    """The result of a decoded JSON-RPC reply; an error reply raises, naming the method."""
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


class Node:
    def __init__(self, root, name, extra=()):
        self.repo = os.path.join(root, name)
        if not os.path.exists(os.path.join(self.repo, "config.toml")):
            subprocess.run([BIN, "--repo", self.repo, "init"], check=True, capture_output=True)
        api = os.path.join(self.repo, "api")
        if os.path.exists(api):
            os.remove(api)
        self.started = time.monotonic()
        self.log = open(os.path.join(self.repo, "node.log"), "w")
        self.proc = subprocess.Popen(
            [BIN, "--repo", self.repo, "run", "--listen", "/ip4/127.0.0.1/tcp/0",
             "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0",
             "--gateway", "127.0.0.1:0", "--app-api", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while not os.path.exists(api):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.repo}/node.log")
            time.sleep(0.005)
        self.url = open(api).read().strip()
        self.secret = open(os.path.join(self.repo, "api.cookie")).read().strip()
        info = self.call("node_id")
        self.peer_id = info["peer_id"]
        self.addresses = info["addresses"]

    def tcp_addr(self):
        return next(a for a in self.addresses if "/tcp/" in a)

    def quic_addr(self):
        return next(a for a in self.addresses if "/quic-v1" in a)

    def call(self, method, params=None, timeout=600):
        req = urllib.request.Request(self.url, rpc_body(method, params).encode(),
                                     {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"})
        return rpc_result(method, json.load(urllib.request.urlopen(req, timeout=timeout)))

    def rss_kb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def hwm_kb(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
