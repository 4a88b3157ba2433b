#!/usr/bin/env python3
"""HAProxy of the HA stack resends a write only when it cannot have reached a server.

    tests/ha/proxy_retry.py

Runs HAProxy with the configuration `scripts/dev up --ha` writes (scripts/ha.sh,
ha_haproxy_conf_text: the same text, on free ports) in front of stub servers that stand
in for the command and query instances, count what reaches them and answer as told:

- a write answered 503 `outcome_unknown` (the batch was sent, then PostgreSQL died or
  the deadline passed) reaches the instance once, and the client gets that answer, not
  the 503 `unavailable` ("nothing was written") of a resend: keyed or not (SPEC 3);
- a write whose connection closes without an answer (the instance died after COMMIT,
  before its reply) reaches it once too, and the client gets 503 `outcome_unknown` as
  the service itself would answer, not HAProxy's 502 page;
- a write whose connection is refused (nothing was sent) is still tried again, and
  when no instance takes it the client gets the service's 503 `unavailable`;
- a read (GET) whose connection is refused, or closed without an answer, is sent again
  to the other query instance, and answered 200.

Needs haproxy (scripts/lib.sh installs it for `scripts/dev test`); exit 77 (skipped)
without it. Exit 0 when every claim holds, 1 otherwise. No timing matters: HAProxy's
health checks are switched off (admin socket) before an instance is stopped, so which
instance a request goes to first never depends on when a check runs.
"""

import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from devports import free_port_base  # noqa: E402

SKIP = 77
# The stack's ports (scripts/ha.sh, ha_load_config) from its base B: HAProxy B+1
# (command), B+2 (query), B+6 (statistics); command-1,2 B+10,11; query-1,2 B+12,13.
PORTS = 13


def say(msg):
    print(f"proxy_retry: {msg}", flush=True)


class Failed(Exception):
    pass


# ------------------------------------------------------------------ the stubs --

def problem(status, code, detail):
    return {"type": f"https://daybook.example/problems/{code}", "title": code,
            "status": status, "detail": detail, "code": code}


class Stub:
    """One instance's stand-in: /readyz 200; what else it answers depends on `mode`.

    mode "unknown": the first POST gets 503 outcome_unknown, any later one 503
    unavailable (what the command service answers to a resend while PostgreSQL is
    away); mode "empty": every request but /readyz is read whole, then its connection
    is closed without an answer; mode "ok": 200 (GET) or 201 (POST)."""

    def __init__(self, name, port):
        self.name, self.port = name, port
        self.mode = "ok"
        self.lock = threading.Lock()
        self.seen = []  # (method, path, Idempotency-Key or None)
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                ctype = "application/problem+json" if status >= 400 else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # HAProxy's check hangs up once it has the status
                    self.close_connection = True

            def serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/readyz":
                    self.answer(200, {"status": "ready"})
                    return
                with stub.lock:
                    stub.seen.append((self.command, self.path,
                                      self.headers.get("Idempotency-Key")))
                    posts = sum(1 for s in stub.seen if s[0] == "POST")
                    mode = stub.mode
                if mode == "empty":
                    self.close_connection = True
                    return
                if self.command == "POST" and mode == "unknown":
                    if posts == 1:
                        self.answer(503, problem(503, "outcome_unknown",
                                                 "it may or may not have been applied"))
                    else:
                        self.answer(503, problem(503, "unavailable",
                                                 "nothing was written: retry"))
                    return
                self.answer(201 if self.command == "POST" else 200, {"served_by": stub.name})

            do_GET = do_POST = do_HEAD = serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.holder = None

    def reset(self, mode):
        with self.lock:
            self.mode = mode
            self.seen = []

    def requests(self, method=None):
        with self.lock:
            return [s for s in self.seen if method is None or s[0] == method]

    def refuse(self):
        """Stop serving; keep the port bound but not listening, so that a connection
        to it is refused (and no other process takes it meanwhile)."""
        self.server.shutdown()
        self.server.server_close()
        self.holder = socket.socket()
        self.holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.holder.bind(("127.0.0.1", self.port))

    def close(self):
        if self.holder:
            self.holder.close()
        else:
            self.server.shutdown()
            self.server.server_close()


# ------------------------------------------------------------------- HAProxy --

def conf_text(base, state_dir):
    """scripts/ha.sh's HAProxy configuration for the ports from `base`."""
    script = ('set -euo pipefail; source "$1/scripts/ha.sh"; PORT_BASE=$2; DEV_DIR=$3; '
              'PID_DIR=$3; ha_load_config; ha_haproxy_conf_text')
    r = subprocess.run(["bash", "-c", script, "bash", REPO, str(base), state_dir],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or "backend command" not in r.stdout:
        raise Failed(f"ha_haproxy_conf_text failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class Proxy:
    def __init__(self, haproxy, base, state_dir):
        self.base, self.sock = base, os.path.join(state_dir, "haproxy.sock")
        self.conf = os.path.join(state_dir, "haproxy.cfg")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(conf_text(base, state_dir))
        r = subprocess.run([haproxy, "-c", "-q", "-f", self.conf], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise Failed(f"haproxy rejects the configuration: {r.stdout}{r.stderr}")
        self.log = open(os.path.join(state_dir, "haproxy.log"), "w+", encoding="utf-8")
        self.proc = subprocess.Popen([haproxy, "-db", "-f", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def admin(self, command):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.sock)
            s.sendall(command.encode() + b"\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data.decode()
                data += chunk

    def stats(self):
        """{(backend, server): {column: value}} from `show stat`."""
        lines = self.admin("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            raise Failed(f"show stat: {lines[:1]}")
        names = lines[0][2:].split(",")
        rows = {}
        for line in lines[1:]:
            if line:
                row = dict(zip(names, line.split(",")))
                rows[(row["pxname"], row["svname"])] = row
        return rows

    def wait_checked(self, servers, seconds=30):
        """Until each (backend, server) was checked and found UP."""
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise Failed(f"haproxy exited ({self.proc.returncode}): {self.log.read()}")
            try:
                st = self.stats()
                last = {k: (st[k]["status"], st[k]["check_status"]) for k in servers}
                if all(s == "UP" and c == "L7OK" for s, c in last.values()):
                    return
            except (OSError, KeyError, Failed):
                pass
            time.sleep(0.1)
        raise Failed(f"HAProxy did not find {servers} UP within {seconds} s: {last}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def call(port, method, path, body=None, key=None):
    """(status, problem code or served_by or None) of one request on a new connection.

    The request goes out in one write, headers and body: HAProxy can resend a request
    only when it had the whole of it before sending it on (http.client writes the body
    after the headers, and whether HAProxy then saw the body in time would be luck)."""
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
            "Authorization: Bearer test", "Connection: close"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    if key:
        head.append(f"Idempotency-Key: {key}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        r = http.client.HTTPResponse(s, method=method)
        r.begin()
        data = r.read()
    try:
        doc = json.loads(data)
    except ValueError:
        return r.status, None
    return r.status, doc.get("code") or doc.get("served_by")


# ------------------------------------------------------------------ the claims --

def check(problems, ok, what):
    say(("ok: " if ok else "FAILED: ") + what)
    if not ok:
        problems.append(what)


def writes_sent_once(proxy, cmd1, cmd2, problems):
    for mode in ("unknown", "empty"):
        for key in (None, f"key-{mode}"):
            cmd1.reset(mode)
            cmd2.reset("ok")
            status, code = call(proxy.base + 1, "POST", "/accounts/bob/withdrawals",
                                {"amount": 100}, key)
            n = len(cmd1.requests("POST")) + len(cmd2.requests("POST"))
            what = (f"{'keyed' if key else 'unkeyed'} POST, instance answers "
                    f"{'503 outcome_unknown' if mode == 'unknown' else 'nothing'}")
            check(problems, n == 1, f"{what}: reached the instances {n} time(s), want 1")
            # An instance that answers nothing: HAProxy's 502, as the service's own 503
            # outcome_unknown (the write may have committed).
            want = (503, "outcome_unknown")
            check(problems, (status, code) == want,
                  f"{what}: the client got {status} {code}, want {want[0]} {want[1]}")


def refused_write_retried(proxy, cmd1, cmd2, problems):
    # command-1 stays UP for HAProxy (its check is off) while its port refuses: the
    # write is sent to it, its connection fails, and HAProxy tries again.
    proxy.admin("disable health command/command-1")
    cmd1.refuse()
    cmd2.reset("ok")
    before = proxy.stats()[("command", "command-1")]
    status, code = call(proxy.base + 1, "POST", "/accounts/bob/withdrawals", {"amount": 100})
    after = proxy.stats()[("command", "command-1")]
    retried = int(after["wretr"] or 0) - int(before["wretr"] or 0)
    failed = int(after["econ"] or 0) - int(before["econ"] or 0)
    say(f"refused write: the client got {status} {code}; command-1: connection errors "
        f"+{failed}, retries +{retried}")
    check(problems, failed == 1 and retried >= 1,
          f"a write whose connection was refused was tried again ({retried} retries)")
    check(problems, (status, code) == (503, "unavailable"),
          f"a write no instance took: the client got {status} {code}, want 503 unavailable")
    check(problems, not cmd2.requests(), "command-2 (a backup) got nothing while command-1 "
          "was UP")


def reads_retried(proxy, q1, q2, problems):
    for mode in ("empty", "refused"):
        q2.reset("ok")
        if mode == "empty":
            q1.reset("empty")
        else:
            proxy.admin("disable health query/query-1")
            q1.refuse()
        before = proxy.stats()[("query", "query-1")]
        answers = [call(proxy.base + 2, "GET", f"/accounts/bob?n={i}") for i in range(4)]
        after = proxy.stats()[("query", "query-1")]
        check(problems, all(a == (200, "query-2") for a in answers),
              f"reads with query-1 {'closing without an answer' if mode == 'empty' else 'refusing'}"
              f": answered {answers}, want 200 from query-2 each")
        if mode == "empty":
            check(problems, len(q1.requests("GET")) >= 1,
                  f"query-1 got {len(q1.requests('GET'))} of the reads first, want at least 1")
        else:
            moved = int(after["wredis"] or 0) - int(before["wredis"] or 0)
            check(problems, moved >= 1,
                  f"{moved} of the reads were refused by query-1 and sent on to query-2, "
                  "want at least 1")


def main():
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access(
        "/usr/sbin/haproxy", os.X_OK) else None)
    if not haproxy:
        say("SKIP: haproxy is not installed (Debian: haproxy)")
        return SKIP
    state_dir = tempfile.mkdtemp(prefix="proxy-retry.")
    if len(state_dir) > 80:  # the admin socket's path must fit sockaddr_un
        shutil.rmtree(state_dir)
        state_dir = tempfile.mkdtemp(prefix="proxy-retry.", dir="/tmp")
    base = free_port_base(PORTS)
    stubs = {}
    proxy = None
    try:
        for name, off in (("command-1", 10), ("command-2", 11), ("query-1", 12),
                          ("query-2", 13)):
            stubs[name] = Stub(name, base + off)
        proxy = Proxy(haproxy, base, state_dir)
        proxy.wait_checked([("command", "command-1"), ("command", "command-2"),
                            ("query", "query-1"), ("query", "query-2")])
        problems = []
        writes_sent_once(proxy, stubs["command-1"], stubs["command-2"], problems)
        refused_write_retried(proxy, stubs["command-1"], stubs["command-2"], problems)
        reads_retried(proxy, stubs["query-1"], stubs["query-2"], problems)
    finally:
        if proxy:
            proxy.stop()
        for s in stubs.values():
            s.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    if problems:
        say(f"FAILED: {len(problems)} claim(s) do not hold")
        return 1
    say("passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        say(f"FAILED: {e}")
        sys.exit(1)
