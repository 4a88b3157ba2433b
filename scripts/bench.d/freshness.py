"""Freshness sampler of scripts/bench.

barrier CMD_PORT QUERY_PORT ACCOUNTS TIMEOUT_S
    deposit 1 cent and wait until the query API shows it (min_position).
sample CMD_PORT QUERY_PORT ACCOUNTS SECONDS INTERVAL_MS OUT
    every INTERVAL_MS: deposit 1 cent into a random account, take the time
    when the 201 has arrived, then GET the account with min_position=<its
    position>&wait_ms=1000 and take the time when a 200 showing the new
    version has arrived. Writes percentiles to OUT (JSON). A read that does
    not show the write (503 projection_behind after wait_ms, or an older
    version) is counted in errors and enters the percentiles with the time it
    took, a lower bound.
Tokens come from DAYBOOK_BENCH_WRITE_TOKEN and DAYBOOK_BENCH_READ_TOKEN."""
import http.client, json, os, random, sys, time
from urllib.parse import quote

WRITE = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_WRITE_TOKEN"],
         "Content-Type": "application/json"}
READ = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_READ_TOKEN"]}


class Client:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def call(self, method, path, body=None, headers=None):
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                self.conn.request(method, path, body, headers or {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise


def deposit(command, accounts):
    account = "a%d" % random.randrange(accounts)
    status, body = command.call("POST", "/accounts/%s/deposits" % account,
                                '{"amount":1,"reference":"freshness"}', WRITE)
    stamp = time.perf_counter()
    if status != 201:
        return account, None, None, stamp, status
    answer = json.loads(body)
    return account, answer["version"], answer["position"], stamp, status


def read_at(query, account, position, wait_ms):
    status, body = query.call("GET", "/accounts/%s?min_position=%s&wait_ms=%d"
                              % (account, quote(position, safe=""), wait_ms), None, READ)
    stamp = time.perf_counter()
    version = json.loads(body).get("version") if status == 200 else None
    return status, version, stamp


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))  # nearest rank
    return round(sorted_values[int(rank) - 1] * 1000, 3)


def barrier(cmd_port, query_port, accounts, timeout_s):
    command, query = Client(int(cmd_port)), Client(int(query_port))
    account, version, position, _, status = deposit(command, int(accounts))
    if version is None:
        sys.exit("barrier: the deposit answered %s" % status)
    deadline = time.monotonic() + float(timeout_s)
    while time.monotonic() < deadline:
        try:
            status, seen, _ = read_at(query, account, position, 10000)
        except (OSError, http.client.HTTPException):
            status, seen = None, None
            time.sleep(0.5)
        if status == 200 and seen is not None and seen >= version:
            return
        if status not in (200, 503, None):
            sys.exit("barrier: GET /accounts/%s answered %s" % (account, status))
    sys.exit("barrier: not visible after %s s" % timeout_s)


def sample(cmd_port, query_port, accounts, seconds, interval_ms, out):
    command, query = Client(int(cmd_port)), Client(int(query_port))
    accounts, interval = int(accounts), float(interval_ms) / 1000
    lags, writes, errors = [], [], {}
    end = time.monotonic() + float(seconds)
    next_at = time.monotonic()
    while time.monotonic() < end:
        before = time.perf_counter()
        account, version, position, written, status = deposit(command, accounts)
        if version is None:
            errors["deposit %s" % status] = errors.get("deposit %s" % status, 0) + 1
        else:
            writes.append(written - before)
            status, seen, visible = read_at(query, account, position, 1000)
            if status == 200 and seen is not None and seen >= version:
                lags.append(visible - written)
            else:
                key = "read %s" % status if status != 200 else "read stale version"
                errors[key] = errors.get(key, 0) + 1
                if status in (200, 503):  # not visible within wait_ms: count it, as a lower bound
                    lags.append(visible - written)
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.monotonic()
    lags.sort()
    writes.sort()
    with open(out, "w") as f:
        json.dump({"samples": len(lags), "p50_ms": percentile(lags, 50),
                   "p99_ms": percentile(lags, 99), "max_ms": percentile(lags, 100),
                   "write_p50_ms": percentile(writes, 50), "write_p99_ms": percentile(writes, 99),
                   "errors": errors}, f)


if __name__ == "__main__":
    {"barrier": barrier, "sample": sample}[sys.argv[1]](*sys.argv[2:])
