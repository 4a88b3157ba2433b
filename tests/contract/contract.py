#!/usr/bin/env python3
"""The HTTP contract: every answer of the running services matches docs/openapi.yaml.

    tests/contract/contract.py [--env FILE] [--spec docs/openapi.yaml]

Starts a private stack with `scripts/dev up` (its own DAYBOOK_DEV_DIR and a free
DAYBOOK_DEV_PORT_BASE; with DAYBOOK_DEV_NO_BUILD=1 and DAYBOOK_BUILD_DIR when meson runs
it), or uses a running one whose `.run/env` is given with --env. It then sends the
integration suite's kinds of requests, successes and every error it can provoke, and
checks each answer against the document: the operation's response for that status
must exist, its required headers must be present and valid, the content type must be
one the document lists, the body must validate against the schema (JSON Schema 2020-12),
and a problem's `status` and `code` must agree with the HTTP status and the document's
table of codes. Routes a build may not serve yet (the event feed, time travel, HEAD,
If-None-Match) are probed once and skipped when absent; the summary says which.
A live /metrics scrape of each service goes through `promtool check metrics` when
promtool is installed.

Needs python3-yaml and python3-jsonschema (Debian packages; scripts/lib.sh installs
them). Exit status 0 when every answer matches, 1 otherwise.
"""

import argparse
import calendar
import datetime
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import jsonschema
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = os.path.join(REPO, "scripts", "dev")
sys.path.insert(0, os.path.join(REPO, "scripts"))
from devports import free_port_base  # noqa: E402


def say(msg):
    print(f"contract: {msg}", file=sys.stderr, flush=True)


# --- the document ------------------------------------------------------------------

def deref(doc, node, seen=()):
    """`node` with every local $ref replaced by its target (the document has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node and isinstance(node["$ref"], str):
            ref = node["$ref"]
            if ref in seen:
                raise ValueError(f"cyclic $ref {ref}")
            target = doc
            for part in ref.lstrip("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            out = deref(doc, target, seen + (ref,))
            if rest:  # siblings of $ref (3.1): both apply
                out = {"allOf": [out, deref(doc, rest, seen)]}
            return out
        return {k: deref(doc, v, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [deref(doc, v, seen) for v in node]
    return node


class Contract:
    def __init__(self, path):
        with open(path) as f:  # the OpenAPI document under test
            self.raw = yaml.safe_load(f)
        self.doc = deref(self.raw, self.raw)
        self.code_status = self._code_table()
        self.failures = []
        self.checked = 0
        self.covered = set()

    def _code_table(self):
        """status by problem code, from the table in ProblemCode's description."""
        pc = self.raw["components"]["schemas"]["ProblemCode"]
        table = {}
        for line in pc["description"].splitlines():
            m = re.match(r"\|\s*(\d{3})\s*\|(.*)\|", line)
            if m:
                for code in re.findall(r"`([a-z_]+)`", m.group(2)):
                    table[code] = int(m.group(1))
        missing = set(pc["enum"]) ^ set(table)
        if missing:
            raise SystemExit(f"contract: ProblemCode's enum and table differ: {sorted(missing)}")
        return table

    def fail(self, what, msg):
        self.failures.append(f"{what}: {msg}")
        say(f"MISMATCH {what}: {msg}")

    def validate(self, schema, value):
        v = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
        return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in v.iter_errors(value)]

    def response_spec(self, template, method, status):
        # HEAD answers as GET does, without the body (info.description says so).
        op = self.doc["paths"].get(template, {}).get("get" if method == "HEAD" else method.lower())
        if op is None:
            return None, f"no operation {method} {template} in the document"
        resp = op["responses"].get(str(status)) or op["responses"].get("default")
        if resp is None:
            return None, (f"{method} {template} answered {status}, which the document does "
                          f"not list (it lists {', '.join(sorted(op['responses']))})")
        return resp, None

    def check(self, what, resp, template=None, method=None, component=None):
        """Check one answer against the operation's response (or a components response)."""
        self.checked += 1
        if component:
            spec = self.doc["components"]["responses"][component]
        else:
            spec, err = self.response_spec(template, method, resp.status)
            if err:
                self.fail(what, err)
                return
            self.covered.add((template, method, resp.status))
        for name, h in spec.get("headers", {}).items():
            value = resp.getheader(name)
            if value is None:
                if h.get("required"):
                    self.fail(what, f"required header {name} is missing")
                continue
            for e in self.validate(h.get("schema", {}), value):
                self.fail(what, f"header {name}: {e}")
        content = spec.get("content")
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if method == "HEAD":
            if resp.body:
                self.fail(what, "HEAD answered with a body")
            return
        if not content:
            if resp.body:
                self.fail(what, f"the document lists no body for {resp.status}, got {len(resp.body)} bytes")
            return
        if ctype not in content:
            self.fail(what, f"Content-Type {ctype!r}, the document lists {sorted(content)}")
            return
        schema = content[ctype].get("schema", {})
        if ctype.endswith("json"):
            try:
                body = json.loads(resp.body)
            except ValueError as e:
                self.fail(what, f"the body is not JSON: {e}")
                return
            for e in self.validate(schema, body):
                self.fail(what, f"body {e}")
            if ctype == "application/problem+json" and isinstance(body, dict):
                code = body.get("code")
                if body.get("status") != resp.status:
                    self.fail(what, f"problem status {body.get('status')} != HTTP {resp.status}")
                if code in self.code_status and self.code_status[code] != resp.status:
                    self.fail(what, f"code {code} is documented as {self.code_status[code]}, "
                                    f"answered {resp.status}")
            resp.json = body
        else:
            resp.json = None


# --- HTTP --------------------------------------------------------------------------

class Answer:
    def __init__(self, r, body):
        self.status = r.status
        self.headers = r.getheaders()
        self._h = {k.lower(): v for k, v in self.headers}
        self.body = body
        self.json = None

    def getheader(self, name):
        return self._h.get(name.lower())


def send(url, method, path, body=None, headers=None, raw=None, timeout=15):
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        payload = r.read()
        return Answer(r, payload)
    finally:
        c.close()


# --- the stack ---------------------------------------------------------------------

# The formats the document uses, checked here rather than by whatever validators the
# installed jsonschema happens to have (Debian's python3-jsonschema checks neither
# date-time nor uri; a pip one with rfc3339-validator does): the same checks everywhere.
FORMATS = jsonschema.FormatChecker(())
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


@FORMATS.checks("date-time", raises=ValueError)
def is_date_time(value):
    if not isinstance(value, str):
        return True
    if not RFC3339.fullmatch(value):
        return False
    datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")
                                    .replace("t", "T"))
    return True


@FORMATS.checks("uri")
def is_uri(value):
    if not isinstance(value, str):
        return True
    u = urllib.parse.urlsplit(value)
    return bool(u.scheme) and (bool(u.netloc) or u.scheme in ("urn", "mailto"))


def read_env(path):
    out = {}
    with open(path) as f:  # the stack's `.run/env`: export K='v' lines
        for line in f:
            if line.startswith("export "):
                k, _, v = line[len("export "):].strip().partition("=")
                out[k] = v.strip("'\"")
    return out


class Stack:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="daybook-contract.")
        self.env = dict(os.environ)
        self.env.update({"DAYBOOK_DEV_DIR": self.dir,
                         "DAYBOOK_DEV_PORT_BASE": str(free_port_base())})
        if os.environ.get("DAYBOOK_BUILD_DIR"):
            self.env["DAYBOOK_DEV_NO_BUILD"] = "1"
        self.log = os.path.join(self.dir, "dev.log")
        self.ok = False

    def dev(self, *args):
        with open(self.log, "a") as log:  # scripts/dev's output, shown on failure
            return subprocess.run([DEV, *args], env=self.env, stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL, timeout=300).returncode

    def up(self):
        if self.dev("up") != 0:
            with open(self.log) as f:
                sys.stderr.write(f.read()[-4000:])
            raise SystemExit("contract: scripts/dev up failed")
        return read_env(os.path.join(self.dir, "env"))

    def down(self):
        self.dev("down")
        if self.ok:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            say(f"the stack's directory is kept: {self.dir}")


# --- the requests ------------------------------------------------------------------

def run(ct, env):
    C, Q = env["DAYBOOK_COMMAND_URL"], env["DAYBOOK_QUERY_URL"]
    port = urllib.parse.urlsplit(C).port
    P = f"http://127.0.0.1:{port + 2}"  # the projector's metrics port: base+3
    W = {"Authorization": "Bearer " + env["DAYBOOK_WRITE_TOKEN"]}
    R = {"Authorization": "Bearer " + env["DAYBOOK_READ_TOKEN"]}
    run_id = f"{random.randrange(1 << 32):08x}"
    skipped = []

    def cmd(what, template, path, body=None, headers=None, raw=None, expect=None, token=W):
        h = dict(token)
        h.update(headers or {})
        a = send(C, "POST", path, body, h, raw)
        ct.check(what, a, template, "POST")
        if expect is not None and a.status != expect:
            ct.fail(what, f"expected {expect}, got {a.status} {a.body[:200]!r}")
        return a

    def read(what, template, path, headers=None, expect=None, method="GET", token=R):
        h = dict(token)
        h.update(headers or {})
        a = send(Q, method, path, None, h)
        ct.check(what, a, template, method)
        if expect is not None and a.status != expect:
            ct.fail(what, f"expected {expect}, got {a.status} {a.body[:200]!r}")
        return a

    def code(a):
        return a.json.get("code") if isinstance(a.json, dict) else None

    def expect_code(what, a, want):
        if code(a) != want:
            ct.fail(what, f"expected code {want}, got {a.status} {code(a)}")

    # Operations routes on every service.
    for name, url in (("command", C), ("query", Q), ("projector", P)):
        for route in ("/healthz", "/readyz", "/metrics"):
            a = send(url, "GET", route)
            ct.check(f"{name} GET {route}", a, route, "GET")
            # They take no query parameters: a malformed query string is refused.
            a = send(url, "GET", route + "?%zz")
            ct.check(f"{name} GET {route}?%zz", a, route, "GET")
            expect_code(f"{name} GET {route}?%zz", a, "invalid_request")
        a = send(url, "POST", "/healthz", raw=b"")
        ct.check(f"{name} POST /healthz", a, "/healthz", "POST", component="MethodNotAllowed")
        expect_code(f"{name} POST /healthz", a, "method_not_allowed")
    a = send(C, "GET", "/no/such/route", headers=W)
    ct.check("GET /no/such/route", a, component="NotFound")
    expect_code("GET /no/such/route", a, "not_found")
    a = send(C, "GET", "/transfers", headers=W)
    ct.check("GET /transfers on command", a, component="MethodNotAllowed")
    expect_code("GET /transfers on command", a, "method_not_allowed")

    head = send(C, "HEAD", "/healthz").status == 200
    if not head:
        skipped.append("HEAD (not served by this build)")

    # Authentication.
    acct = lambda n: f"ct-{run_id}-{n}"  # noqa: E731
    a = cmd("no token", "/accounts", "/accounts", {"id": acct("x"), "name": "x", "currency": "EUR"},
            token={}, expect=401)
    expect_code("no token", a, "unauthorized")
    a = cmd("unknown token", "/accounts", "/accounts", {"id": acct("x"), "name": "x", "currency": "EUR"},
            token={"Authorization": "Bearer nope"}, expect=401)
    a = cmd("read token on a command", "/accounts", "/accounts",
            {"id": acct("x"), "name": "x", "currency": "EUR"}, token=R, expect=403)
    expect_code("read token on a command", a, "forbidden")
    a = read("write token on a read", "/totals", "/totals", token=W, expect=403)

    # Opening accounts.
    a_id, b_id, c_id, d_id = acct("a"), acct("b"), acct("c"), acct("d")
    for i, cur in ((a_id, "EUR"), (b_id, "EUR"), (c_id, "USD"), (d_id, "EUR")):
        a = cmd(f"open {i}", "/accounts", "/accounts", {"id": i, "name": "Contract " + i,
                                                         "currency": cur}, expect=201)
    a = cmd("open with overdraft", "/accounts", "/accounts",
            {"id": acct("o"), "name": "o", "currency": "EUR", "overdraft_limit": 500}, expect=201)
    a = cmd("open twice", "/accounts", "/accounts", {"id": a_id, "name": "again", "currency": "EUR"},
            expect=409)
    expect_code("open twice", a, "account_exists")
    for what, raw, body in (
        ("malformed JSON", b"{\"id\":", None),
        ("unknown field", None, {"id": acct("y"), "name": "y", "currency": "EUR", "colour": "red"}),
        ("bad currency", None, {"id": acct("y"), "name": "y", "currency": "eur"}),
        ("bad id", None, {"id": "no spaces please", "name": "y", "currency": "EUR"}),
        ("missing name", None, {"id": acct("y"), "currency": "EUR"}),
        ("float overdraft", None, {"id": acct("y"), "name": "y", "currency": "EUR",
                                   "overdraft_limit": 1.5}),
    ):
        a = cmd(what, "/accounts", "/accounts", body,
                headers={"Content-Type": "application/json"}, raw=raw, expect=400)
        expect_code(what, a, "invalid_request")
    a = cmd("text body", "/accounts", "/accounts", raw=b"id=1",
            headers={"Content-Type": "text/plain"}, expect=415)
    a = cmd("large body", "/accounts", "/accounts",
            raw=json.dumps({"id": acct("big"), "name": "n" * 70000, "currency": "EUR"}).encode(),
            headers={"Content-Type": "application/json"}, expect=413)
    a = cmd("bad idempotency key", "/accounts", "/accounts",
            {"id": acct("k"), "name": "k", "currency": "EUR"},
            headers={"Idempotency-Key": "x" * 300}, expect=400)

    # Money.
    dep = "/accounts/{id}/deposits"
    wd = "/accounts/{id}/withdrawals"
    a = cmd("deposit with If-Match", dep, f"/accounts/{a_id}/deposits",
            {"amount": 10000, "reference": "salary"}, headers={"If-Match": '"1"'}, expect=201)
    last = a.json.get("position") if isinstance(a.json, dict) else None
    a = cmd("deposit, stale If-Match", dep, f"/accounts/{a_id}/deposits", {"amount": 1},
            headers={"If-Match": '"1"'}, expect=412)
    expect_code("deposit, stale If-Match", a, "version_mismatch")
    a = cmd("deposit, bad If-Match", dep, f"/accounts/{a_id}/deposits", {"amount": 1},
            headers={"If-Match": "soon"}, expect=400)
    a = cmd("deposit to nobody", dep, f"/accounts/{acct('nobody')}/deposits", {"amount": 1},
            expect=404)
    expect_code("deposit to nobody", a, "account_not_found")
    a = cmd("deposit zero", dep, f"/accounts/{a_id}/deposits", {"amount": 0}, expect=400)
    a = cmd("deposit 10^15+1", dep, f"/accounts/{a_id}/deposits", {"amount": 10**15 + 1},
            expect=400)
    a = cmd("deposit a string", dep, f"/accounts/{a_id}/deposits", {"amount": "5"}, expect=400)
    a = cmd("withdraw", wd, f"/accounts/{a_id}/withdrawals", {"amount": 1000}, expect=201)
    a = cmd("withdraw too much", wd, f"/accounts/{a_id}/withdrawals", {"amount": 10**9}, expect=422)
    expect_code("withdraw too much", a, "insufficient_funds")
    a = cmd("withdraw into overdraft", wd, f"/accounts/{acct('o')}/withdrawals", {"amount": 500},
            expect=201)

    # Transfers.
    tid = f"ct-{run_id}-t1"
    a = cmd("transfer", "/transfers", "/transfers",
            {"id": tid, "from": a_id, "to": b_id, "amount": 2500, "reference": "rent"}, expect=201)
    if isinstance(a.json, dict):
        last = a.json.get("position", last)
    a = cmd("transfer again", "/transfers", "/transfers",
            {"id": tid, "from": a_id, "to": b_id, "amount": 2500}, expect=409)
    expect_code("transfer again", a, "transfer_exists")
    for what, body, status, want in (
        ("transfer across currencies", {"id": tid + "x", "from": a_id, "to": c_id, "amount": 1},
         422, "currency_mismatch"),
        ("transfer to itself", {"id": tid + "y", "from": a_id, "to": a_id, "amount": 1},
         422, "same_account"),
        ("transfer to nobody", {"id": tid + "z", "from": a_id, "to": acct("nobody"), "amount": 1},
         404, "account_not_found"),
        ("transfer too much", {"id": tid + "w", "from": b_id, "to": a_id, "amount": 10**9},
         422, "insufficient_funds"),
        ("transfer without amount", {"id": tid + "v", "from": b_id, "to": a_id}, 400,
         "invalid_request"),
    ):
        a = cmd(what, "/transfers", "/transfers", body, expect=status)
        expect_code(what, a, want)
    a = cmd("If-Match on a transfer", "/transfers", "/transfers",
            {"id": tid + "u", "from": b_id, "to": a_id, "amount": 1}, headers={"If-Match": '"1"'},
            expect=400)

    # Idempotency.
    key = {"Idempotency-Key": f"ct-{run_id}-key"}
    a = cmd("keyed deposit", dep, f"/accounts/{b_id}/deposits", {"amount": 7}, headers=key, expect=201)
    a = cmd("keyed deposit, repeated", dep, f"/accounts/{b_id}/deposits", {"amount": 7}, headers=key,
            expect=201)
    if a.getheader("Idempotent-Replayed") != "true":
        ct.fail("keyed deposit, repeated", "no Idempotent-Replayed: true")
    a = cmd("keyed deposit, other body", dep, f"/accounts/{b_id}/deposits", {"amount": 8},
            headers=key, expect=422)
    expect_code("keyed deposit, other body", a, "idempotency_key_reused")
    a = cmd("keyed refusal", wd, f"/accounts/{b_id}/withdrawals", {"amount": 10**12},
            headers={"Idempotency-Key": f"ct-{run_id}-k2"}, expect=422)
    a = cmd("keyed refusal, repeated", wd, f"/accounts/{b_id}/withdrawals", {"amount": 10**12},
            headers={"Idempotency-Key": f"ct-{run_id}-k2"}, expect=422)
    # Concurrent repeats may meet the first in flight (409 request_in_progress): every
    # answer, whichever it is, must match the document.
    answers, lock = [], threading.Lock()

    def racer():
        h = dict(W)
        h["Idempotency-Key"] = f"ct-{run_id}-race"
        ans = send(C, "POST", f"/accounts/{b_id}/deposits", {"amount": 3}, h)
        with lock:
            answers.append(ans)
    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ans in enumerate(answers):
        ct.check(f"concurrent keyed deposit {i}", ans, dep, "POST")
        if ans.status not in (201, 409):
            ct.fail(f"concurrent keyed deposit {i}", f"answered {ans.status}")

    # Closing.
    a = cmd("close", "/accounts/{id}/close", f"/accounts/{d_id}/close", expect=201)
    a = cmd("close with {}", "/accounts/{id}/close", f"/accounts/{c_id}/close", {}, expect=201)
    a = cmd("deposit to a closed account", dep, f"/accounts/{d_id}/deposits", {"amount": 1},
            expect=422)
    expect_code("deposit to a closed account", a, "account_closed")
    a = cmd("close with money", "/accounts/{id}/close", f"/accounts/{a_id}/close", expect=422)
    expect_code("close with money", a, "nonzero_balance")
    a = cmd("close with a field", "/accounts/{id}/close", f"/accounts/{b_id}/close", {"x": 1},
            expect=400)
    a = cmd("transfer", "/transfers", "/transfers",
            {"id": tid + "2", "from": b_id, "to": a_id, "amount": 1}, expect=201)
    if isinstance(a.json, dict):
        last = a.json.get("position", last)

    # Reads (read-your-writes on the last write).
    mp = urllib.parse.quote(last or "")
    a = read("account", "/accounts/{id}", f"/accounts/{a_id}?min_position={mp}", expect=200)
    etag = a.getheader("ETag")
    # The database's time of the account's last event (its clock decides `at` below).
    a_updated = a.json.get("updated_at") if isinstance(a.json, dict) else None
    read("account by header", "/accounts/{id}", f"/accounts/{b_id}",
         headers={"X-Daybook-Min-Position": last or ""}, expect=200)
    read("closed account", "/accounts/{id}", f"/accounts/{d_id}?min_position={mp}", expect=200)
    a = read("no account", "/accounts/{id}", f"/accounts/{acct('nobody')}", expect=404)
    expect_code("no account", a, "account_not_found")
    read("bad account id", "/accounts/{id}", "/accounts/a%20b", expect=400)
    a = read("bad min_position", "/accounts/{id}", f"/accounts/{a_id}?min_position=yesterday",
             expect=400)
    a = read("far min_position", "/accounts/{id}", f"/accounts/{a_id}?min_position=999999999.999999999&wait_ms=0",
             expect=503)
    expect_code("far min_position", a, "projection_behind")
    read("wait_ms too long", "/accounts/{id}", f"/accounts/{a_id}?wait_ms=10001", expect=400)
    a = read("unknown query parameter", "/accounts/{id}", f"/accounts/{a_id}?min_positon={mp}")
    if a.status == 200:
        skipped.append("unknown query parameters (ignored by this build)")
    elif a.status != 400:
        ct.fail("unknown query parameter", f"answered {a.status}")
    try:
        a = send(Q, "GET", f"/accounts/{a_id}", headers={**R, "X-Padding": "p" * 17000})
        if a.status == 431:
            ct.check("headers over 16 KiB", a, component="HeadersTooLarge")
            expect_code("headers over 16 KiB", a, "headers_too_large")
        else:
            skipped.append(f"431 (headers over 16 KiB answered {a.status})")
    except OSError as e:  # a build may close the connection instead
        skipped.append(f"431 (headers over 16 KiB: {e})")
    if etag:
        a = read("If-None-Match", "/accounts/{id}", f"/accounts/{a_id}",
                 headers={"If-None-Match": etag})
        if a.status != 304:
            skipped.append("If-None-Match (answered 200: not served by this build)")
    tx = "/accounts/{id}/transactions"
    a = read("transactions", tx, f"/accounts/{a_id}/transactions?limit=2&min_position={mp}",
             expect=200)
    nb = a.json.get("next_before") if isinstance(a.json, dict) else None
    if nb:
        read("transactions, next page", tx, f"/accounts/{a_id}/transactions?limit=2&before={nb}",
             expect=200)
    read("transactions, limit 0", tx, f"/accounts/{a_id}/transactions?limit=0", expect=400)
    read("transactions, limit 501", tx, f"/accounts/{a_id}/transactions?limit=501", expect=400)
    read("transactions of nobody", tx, f"/accounts/{acct('nobody')}/transactions", expect=404)
    ev = "/accounts/{id}/events"
    read("account events", ev, f"/accounts/{a_id}/events?min_position={mp}", expect=200)
    read("account events after 2", ev, f"/accounts/{a_id}/events?after_version=2&limit=1",
         expect=200)
    read("account events, bad after_version", ev, f"/accounts/{a_id}/events?after_version=-1",
         expect=400)
    read("events of nobody", ev, f"/accounts/{acct('nobody')}/events", expect=404)
    read("transfer", "/transfers/{id}", f"/transfers/{tid}?min_position={mp}", expect=200)
    a = read("no transfer", "/transfers/{id}", f"/transfers/{tid}-none", expect=404)
    expect_code("no transfer", a, "transfer_not_found")
    read("totals", "/totals", f"/totals?min_position={mp}", expect=200)
    a = send(Q, "POST", "/totals", raw=b"{}", headers=R)
    ct.check("POST /totals on query", a, component="MethodNotAllowed")
    if head:
        read("HEAD account", "/accounts/{id}", f"/accounts/{a_id}", method="HEAD", expect=200)
        read("HEAD no account", "/accounts/{id}", f"/accounts/{acct('nobody')}", method="HEAD",
             expect=404)

    # Time travel (SPEC 4.2), when served: before the account existed it is a 404.
    probe = send(Q, "GET", f"/accounts/{a_id}?at=2000-01-01T00:00:00Z", headers=R)
    if probe.status == 404:
        read("account at a time before it", "/accounts/{id}",
             f"/accounts/{a_id}?at=2000-01-01T00:00:00Z", expect=404)
        # `now`: the whole second after the account's last event as the database
        # recorded it (its `updated_at`), not this host's clock, which may have been
        # stepped since (a fresh virtual machine's clock is). The read waits until the
        # database's clock has passed it, well within wait_ms.
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", a_updated or "")
        if not m:
            ct.fail("account", f"no updated_at to travel to: {a_updated!r}")
            m = re.match(r"(.*)", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
        last_second = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_second + 1))
        read("account at now", "/accounts/{id}", f"/accounts/{a_id}?at={now}&wait_ms=5000", expect=200)
        read("account as_of", "/accounts/{id}", f"/accounts/{a_id}?as_of={mp}", expect=200)
        read("account at a bad time", "/accounts/{id}", f"/accounts/{a_id}?at=noon", expect=400)
        read("transactions at", tx, f"/accounts/{a_id}/transactions?at={now}&wait_ms=5000",
             expect=200)
        a = read("account at a time to come", "/accounts/{id}",
                 f"/accounts/{a_id}?at=2999-01-01T00:00:00Z&wait_ms=0", expect=503)
        expect_code("account at a time to come", a, "projection_behind")
    else:
        skipped.append(f"time travel (as_of/at answered {probe.status}: not served by this build)")

    # The event feed (SPEC 4.1), when served.
    probe = send(Q, "GET", "/events?limit=1", headers=R)
    if probe.status == 404 and b"not_found" in probe.body and b"account" not in probe.body:
        skipped.append("the event feed (/events answered 404 not_found: not served by this build)")
    else:
        a = read("feed", "/events", "/events?limit=3", expect=200)
        nxt = a.json.get("next_after") if isinstance(a.json, dict) else None
        if nxt:
            read("feed, next page", "/events",
                 f"/events?after={urllib.parse.quote(nxt)}&limit=1000", expect=200)
        read("feed, filtered", "/events",
             f"/events?type=TransferSent,TransferReceived&stream=account-{a_id}&limit=10", expect=200)
        read("feed, long-poll at the head", "/events",
             f"/events?after={mp}&type=AccountClosed&stream=account-{a_id}&wait_ms=100", expect=200)
        read("feed, limit 0", "/events", "/events?limit=0", expect=400)
        read("feed, bad type", "/events", "/events?type=Nope", expect=400)
        read("feed, bad after", "/events", "/events?after=tomorrow", expect=400)
        read("feed, wait_ms too long", "/events", "/events?wait_ms=30001", expect=400)
        read("feed without a token", "/events", "/events", token={}, expect=401)
        check_stream(ct, Q, R)

    # Metrics, after the traffic: the families docs/metrics.md promises on each service,
    # the latency histogram by route and status, and promtool's lint of the scrape.
    for name, url in (("command", C), ("query", Q), ("projector", P)):
        text = send(url, "GET", "/metrics").body
        promtool_check(ct, name, text)
        check_metrics(ct, name, text.decode())

    return skipped


COMMON_METRICS = (
    "daybook_build_info{", "process_cpu_seconds_total ", "process_resident_memory_bytes ",
    "process_open_fds ", "process_start_time_seconds ", "daybook_http_requests_total{",
    "daybook_http_requests_in_flight ",
)
SERVICE_METRICS = {
    "command": (
        'daybook_http_request_duration_seconds_bucket{method="POST",route="/accounts",status="201",le=',
        'daybook_http_request_duration_seconds_bucket{method="POST",route="/transfers",status="422",le=',
        "daybook_append_batch_size_bucket{", "daybook_append_batch_events_bucket{",
        "daybook_append_commit_seconds_bucket{", "daybook_events_appended_total ",
        "daybook_idempotent_replays_total ", "daybook_idempotency_records ",
    ),
    "query": (
        'daybook_http_request_duration_seconds_bucket{method="GET",route="/accounts/{id}",status="200",le=',
        'daybook_http_request_duration_seconds_bucket{method="GET",route="/accounts/{id}",status="404",le=',
        "daybook_query_redis_fallbacks_total{reason=", "daybook_query_reads_total{model=",
    ),
    "projector": (
        'daybook_projection_position{projection="sql"} ', 'daybook_projection_position{projection="redis"} ',
        'daybook_projection_lag_events{projection="sql"} ', 'daybook_projection_lag_events{projection="redis"} ',
        'daybook_projection_lag_seconds{projection="sql"} ', 'daybook_projection_lag_seconds{projection="redis"} ',
        "daybook_projection_batch_events_bucket{", "daybook_projection_commit_seconds_bucket{",
        "daybook_projector_leader ",
    ),
}


def check_metrics(ct, name, text):
    ct.checked += 1
    lines = text.splitlines()
    for want in COMMON_METRICS + SERVICE_METRICS[name]:
        if not any(line.startswith(want) for line in lines):
            ct.fail(f"{name} /metrics", f"no sample starting {want!r}")


def check_stream(ct, url, auth):
    """Open /events/stream, read the first event, check it against FeedEvent."""
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
    h = dict(auth)
    h["Accept"] = "text/event-stream"
    what = "feed stream"
    try:
        c.request("GET", "/events/stream?type=FundsDeposited", headers=h)
        r = c.getresponse()
        ans = Answer(r, b"")
        if r.status != 200:
            ans.body = r.read()
            ct.check(what, ans, "/events/stream", "GET")
            ct.fail(what, f"answered {r.status}")
            return
        ct.check(what, ans, "/events/stream", "GET")
        ident = data = None
        while data is None:
            line = r.fp.readline()
            if not line:
                break
            line = line.decode().rstrip("\r\n")
            if line.startswith("id:"):
                ident = line[3:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if data is None:
            ct.fail(what, "the stream ended before an event")
            return
        schema = ct.doc["components"]["schemas"]["FeedEvent"]
        try:
            obj = json.loads(data)
        except ValueError as e:
            ct.fail(what, f"data is not JSON: {e}")
            return
        for e in ct.validate(schema, obj):
            ct.fail(what, f"event {e}")
        if ident != obj.get("position"):
            ct.fail(what, f"id {ident!r} is not the event's position {obj.get('position')!r}")
        ct.checked += 1
    except OSError as e:
        ct.fail(what, f"{e}")
    finally:
        c.close()


def promtool_check(ct, name, text):
    """promtool check metrics on a live scrape (lint: names, HELP, TYPE, histograms)."""
    promtool = shutil.which("promtool")
    if not promtool:
        return
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       timeout=60)
    out = (r.stdout + r.stderr).decode().strip()
    if r.returncode != 0:
        ct.fail(f"{name} /metrics", f"promtool check metrics: {out[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", help="the env file of a running stack (default: start one)")
    ap.add_argument("--spec", default=os.path.join(REPO, "docs", "openapi.yaml"))
    args = ap.parse_args()
    ct = Contract(args.spec)
    stack = None
    try:
        if args.env:
            env = read_env(args.env)
        else:
            stack = Stack()
            env = stack.up()
        skipped = run(ct, env)
        if stack:
            stack.ok = not ct.failures
    finally:
        if stack:
            stack.down()
    for s in skipped:
        say(f"skipped: {s}")
    if not shutil.which("promtool"):
        say("skipped: promtool check metrics (promtool is not installed)")
    ops = sum(len([m for m in p if m in ("get", "post")]) for p in ct.doc["paths"].values())
    say(f"{ct.checked} answers checked; {len(ct.covered)} documented (operation, status) "
        f"pairs exercised over {ops} operations; {len(ct.failures)} mismatches")
    return 1 if ct.failures else 0


if __name__ == "__main__":
    sys.exit(main())
