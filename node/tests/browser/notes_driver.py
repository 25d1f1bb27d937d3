"""Drives the notes example app (examples/notes/) in headless Chromium for node/tests/notes_app.rs.

The Rust test starts and stops the nodes; this script owns the browsers and the wallet. It
reads one JSON command per line on stdin and answers each with one JSON line on stdout,
`{"ok": result}` or `{"error": "what went wrong"}`; everything else it prints goes to stderr.

The wallet is a secp256k1 key made here with eth-account, which neither the node nor the page
ever sees. Each browser gets an EIP-1193 provider (`window.ethereum`, injected before any page
script through CDP `Page.addScriptToEvaluateOnNewDocument`) whose `personal_sign` puts the
request in a queue of the page; this script polls the queue, checks the message with the
independent EIP-4361 parser (eip4361.py) — a sign-in for the page's own origin, for this
wallet, through the node — signs it with the key and hands the signature back to the page.

Commands (`browser` names a browser; the first command naming it starts it):
  wallet                                   → {address}
  open {browser, url}                      → {}
  sign_in {browser, timeout}               → {message, domain, uri, nonce, expiration}
  new_note {browser, title, body}          → {id}
  edit_note {browser, id, title?, body?}   → {}
  wait_note {browser, id, title, body, timeout} → {seconds}
  wait_status {browser, state, queued?, timeout} → {state, queued, text}
  status {browser}                         → {state, queued, text}
  call {browser, method, params}           → the JSON-RPC reply of a fetch from the page
  offline_ready {browser, timeout}         → {} once the service worker controls the page
  reload {browser}                         → {} (the page reloaded, even with its node away)
  screenshot {browser, path}               → {bytes}
  quit                                     → {} (also on end of input)

Chromium runs headless with --no-sandbox (the tests run as root inside a network namespace
with only loopback) and resolves no host name: the pages are on 127.0.0.1.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import encode_defunct
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

# The test writes nothing into the source tree (no __pycache__ next to this file).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eip4361  # noqa: E402  (next to this file)

CHROMIUM = os.environ.get("KUBELT_CHROMIUM", "/usr/lib/chromium/chromium")
CHROMEDRIVER = os.environ.get("KUBELT_CHROMEDRIVER", "/usr/bin/chromedriver")

# The EIP-1193 provider of the test wallet. `personal_sign` waits for the driver, which takes
# the requests with `take()` and answers each with `answer(id, signature, error)`.
PROVIDER = """
(() => {
  const address = %(address)s;
  const waiting = new Map();
  const requests = [];
  let next = 1;
  window.__testWallet = {
    take: () => requests.splice(0),
    answer(id, result, error) {
      const call = waiting.get(id);
      waiting.delete(id);
      if (!call) return false;
      if (error) call.reject(Object.assign(new Error(error.message), { code: error.code }));
      else call.resolve(result);
      return true;
    },
  };
  window.ethereum = {
    isKubeltTestWallet: true,
    async request({ method, params }) {
      switch (method) {
        case 'eth_requestAccounts':
        case 'eth_accounts':
          return [address];
        case 'eth_chainId':
          return '0x1';
        case 'personal_sign':
          return new Promise((resolve, reject) => {
            const id = next++;
            waiting.set(id, { resolve, reject });
            requests.push({ id, method, params });
          });
        default:
          throw Object.assign(new Error(`unsupported method ${method}`), { code: 4200 });
      }
    },
    on() {},
    removeListener() {},
  };
})();
"""


COMMANDS = {
    "wallet", "open", "sign_in", "new_note", "edit_note", "wait_note", "wait_status", "status", "call",
    "offline_ready", "reload", "screenshot", "quit",
}


class Failure(Exception):
    """A command could not be done; the message goes back to the test."""


def log(*parts):
    print("notes_driver:", *parts, file=sys.stderr, flush=True)


def wait_for(what, timeout, check, interval=0.1):
    """Polls `check` until it returns something true; returns it, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (StaleElementReferenceException, NoSuchElementException) as error:  # the list re-rendered under us
            last_error = error
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting for {what}" + (f" (last: {last_error})" if last_error else ""))
        time.sleep(interval)


class Browser:
    """One headless Chromium with the test wallet injected."""

    def __init__(self, name, address):
        self.name = name
        self.profile = tempfile.mkdtemp(prefix=f"kubelt-notes-{name}-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-proxy-server",
            # Loopback only: no name resolves (the pages are on 127.0.0.1).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1200,760",
            f"--user-data-dir={self.profile}",
        ]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PROVIDER % {"address": json.dumps(address)}})

    def element(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def status(self):
        status = self.element("#status")
        return {"state": status.get_attribute("data-state"), "queued": int(status.get_attribute("data-queued")), "text": status.text}

    def console(self):
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")]
        except Exception as error:  # the log is only for failure reports
            return [f"(no console log: {error})"]

    def type_into(self, css, text):
        """Replaces a field's text by typing, as a person does: select all, then type (the app
        saves on each input event, which clear() would not fire)."""
        field = self.element(css)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(text if text else Keys.DELETE)

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


class Driver:
    def __init__(self):
        eip4361.self_test()
        self.account = Account.create()
        self.browsers = {}

    def browser(self, command):
        name = command["browser"]
        if name not in self.browsers:
            log(f"starting browser {name}")
            self.browsers[name] = Browser(name, self.account.address)
        return self.browsers[name]

    # ------------------------------------------------------------------ commands

    def wallet(self, _):
        return {"address": self.account.address}

    def open(self, command):
        self.browser(command).driver.get(command["url"])
        return {}

    def sign_in(self, command):
        browser = self.browser(command)
        page = urlsplit(browser.driver.current_url)
        browser.element("#sign-in").click()
        timeout = command.get("timeout", 30)
        requests = wait_for("the page to ask the wallet to sign", timeout, lambda: browser.driver.execute_script("return window.__testWallet.take()"))
        if len(requests) != 1:
            raise Failure(f"the page asked for {len(requests)} signatures at once: {requests}")
        request = requests[0]
        data, address = request["params"]
        if address.lower() != self.account.address.lower():
            raise Failure(f"personal_sign for {address}, not the wallet's {self.account.address}")
        text = bytes.fromhex(data[2:] if data.startswith("0x") else data).decode("utf-8")
        try:
            message = eip4361.parse(text)
        except eip4361.Eip4361Error as error:
            browser.driver.execute_script("window.__testWallet.answer(arguments[0], null, {code: 4001, message: 'refused'})", request["id"])
            raise Failure(f"the page asked to sign a message that is not EIP-4361: {error}\n{text}") from None
        problems = []
        if message.domain != page.netloc:
            problems.append(f"the domain {message.domain!r} is not the page's origin {page.netloc!r}")
        if message.address != self.account.address:
            problems.append(f"the address {message.address} is not the wallet's {self.account.address}")
        if not message.uri.startswith("urn:kubelt:peer:"):
            problems.append(f"the URI {message.uri!r} does not name a Kubelt node")
        if message.expiration_time is None or message.expiration_time <= message.issued_at:
            problems.append("the sign-in has no expiration after its issue time")
        if message.statement is None or "notes" not in message.statement:
            problems.append(f"the statement does not say what is granted: {message.statement!r}")
        if problems:
            browser.driver.execute_script("window.__testWallet.answer(arguments[0], null, {code: 4001, message: 'refused'})", request["id"])
            raise Failure("; ".join(problems) + f"\n{text}")
        signature = Account.sign_message(encode_defunct(text=text), self.account.key).signature.hex()
        signature = signature if signature.startswith("0x") else "0x" + signature
        browser.driver.execute_script("window.__testWallet.answer(arguments[0], arguments[1], null)", request["id"], signature)
        wait_for("the notes to show after signing in", timeout, lambda: browser.element("#notes-panel").is_displayed())
        return {
            "message": text,
            "domain": message.domain,
            "uri": message.uri,
            "nonce": message.nonce,
            "expiration": message.expiration_time.isoformat(),
        }

    def new_note(self, command):
        browser = self.browser(command)
        browser.element("#new-note").click()
        note_id = wait_for("the new note to be selected", 10, lambda: browser.element("#note-list li[aria-selected='true']").get_attribute("data-id"))
        browser.type_into("#note-title", command["title"])
        browser.type_into("#note-body", command["body"])
        return {"id": note_id}

    def edit_note(self, command):
        browser = self.browser(command)
        self.select(browser, command["id"])
        if "title" in command:
            browser.type_into("#note-title", command["title"])
        if "body" in command:
            browser.type_into("#note-body", command["body"])
        return {}

    def select(self, browser, note_id):
        item = f"#note-list li[data-id='{note_id}']"

        def click():
            # The app re-renders its list on every change: find and click in one go, again if
            # the element was replaced in between.
            browser.element(item).click()
            return True

        wait_for(f"note {note_id} in the list", 10, click)
        wait_for(f"note {note_id} to be selected", 10, lambda: browser.element(item).get_attribute("aria-selected") == "true")

    def wait_note(self, command):
        """Waits, without reloading the page, until the list shows the note with this title;
        then opens it and checks its text."""
        browser = self.browser(command)
        started = time.monotonic()
        title_css = f"#note-list li[data-id='{command['id']}'] .title"

        def shown():
            found = browser.driver.find_elements(By.CSS_SELECTOR, title_css)
            return found and found[0].text == command["title"]

        wait_for(f"note {command['id']} titled {command['title']!r}", command.get("timeout", 30), shown)
        self.select(browser, command["id"])
        wait_for(
            f"the body of note {command['id']} to be {command['body']!r}",
            10,
            lambda: browser.element("#note-body").get_attribute("value") == command["body"],
        )
        return {"seconds": round(time.monotonic() - started, 3)}

    def wait_status(self, command):
        browser = self.browser(command)

        def reached():
            status = browser.status()
            if status["state"] == command["state"] and command.get("queued") in (None, status["queued"]):
                return status
            return None

        try:
            return wait_for(f"status {command['state']!r} with {command.get('queued')} queued", command.get("timeout", 30), reached)
        except Failure as error:
            raise Failure(f"{error}; the status is {browser.status()}") from None

    def status(self, command):
        return self.browser(command).status()

    def call(self, command):
        script = """
            const [method, params, done] = arguments;
            fetch('/', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                         body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }) })
              .then((r) => r.json()).then(done, (e) => done({ fetchError: String(e) }));
        """
        return self.browser(command).driver.execute_async_script(script, command["method"], command.get("params"))

    def offline_ready(self, command):
        browser = self.browser(command)
        script = "return !!(navigator.serviceWorker && navigator.serviceWorker.controller)"
        wait_for("the app's service worker to control the page", command.get("timeout", 30), lambda: browser.driver.execute_script(script))
        return {}

    def reload(self, command):
        # Returns once the page has loaded (its deferred script has run by then).
        self.browser(command).driver.refresh()
        return {}

    def screenshot(self, command):
        browser = self.browser(command)
        os.makedirs(os.path.dirname(os.path.abspath(command["path"])), exist_ok=True)
        if not browser.driver.save_screenshot(command["path"]):
            raise Failure(f"cannot write {command['path']}")
        return {"bytes": os.path.getsize(command["path"])}

    def quit(self, _=None):
        for name, browser in list(self.browsers.items()):
            try:
                browser.quit()
            except Exception as error:  # quitting the others matters more
                log(f"cannot quit browser {name}: {error}")
        self.browsers.clear()
        return {}

    # ------------------------------------------------------------------ the loop

    def run(self, commands, replies):
        for line in commands:
            if not line.strip():
                continue
            command, name = None, None
            try:
                command = json.loads(line)
                name = command["cmd"]
                if name not in COMMANDS:
                    raise Failure(f"unknown command {name!r}")
                reply = {"ok": getattr(self, name)(command)}
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                # Selenium's messages end in the driver's native stack trace: not worth reading.
                text = error.msg if isinstance(error, WebDriverException) and error.msg else str(error)
                reply = {"error": f"{type(error).__name__}: {text}{self.report(command)}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
            if name == "quit":
                return

    def report(self, command):
        """What a failed command's browser shows, for the test's error message."""
        browser = self.browsers.get(command.get("browser")) if isinstance(command, dict) else None
        if browser is None:
            return ""
        try:
            return f"\nstatus: {browser.status()}\nconsole: {browser.console()}"
        except Exception as error:  # the report must not hide the failure
            return f"\n(no report: {error})"


def main():
    # Only replies go to stdout: whatever a library prints goes to stderr.
    replies = sys.stdout
    sys.stdout = sys.stderr
    # Selenium must not look for drivers on the network (there is none in the tests).
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = Driver()
    try:
        driver.run(sys.stdin, replies)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
