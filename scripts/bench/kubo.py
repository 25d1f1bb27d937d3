"""Drive a real Kubo through shared/tools/kubo_peer.py (JSON lines)."""
import json, os, subprocess

SCRIPT = os.environ.get("KUBO_PEER") or os.path.join(os.path.dirname(__file__), "../../../shared/tools/kubo_peer.py")


class Kubo:
    def __init__(self):
        self.proc = subprocess.Popen(["python3", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        ident = self.request({"op": "id"})
        self.peer_id = ident["peer"]
        self.addrs = ident["addrs"]

    def request(self, command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def addr(self, kind="/tcp/"):
        a = next(x for x in self.addrs if kind in x)
        return a if "/p2p/" in a else f"{a}/p2p/{self.peer_id}"

    def add(self, path):
        return self.request({"op": "add", "path": path})["cid"]

    def get(self, cid, out):
        return self.request({"op": "get", "cid": cid, "out": out})["ok"]

    def connect(self, addr):
        return self.request({"op": "connect", "addr": addr})["ok"]

    def quit(self):
        try:
            self.request({"op": "quit"})
        except Exception:
            pass
        self.proc.kill()
        # Wait until it is gone: a Kubo still exiting (its heap torn down) competed with whatever
        # the bench timed next, and took kubelt's add from 0.18 s to 0.3-0.4 s here.
        self.proc.wait()
