"""Freshness sampler of scripts/bench.

barrier CMD_PORT QUERY_PORT ACCOUNTS TIMEOUT_S
    deposit 1 cent and wait until the query API shows it (min_position).
sample CMD_PORT QUERY_PORT ACCOUNTS SECONDS INTERVAL_MS OUT
    every INTERVAL_MS: deposit 1 cent into a random account, take the
    kernel's receive time of its 201, then GET the account with
    min_position=<its position>&wait_ms=1000 and take the kernel's receive
    time of the 200 showing the new version (kstamp.py). Writes percentiles
    to OUT (JSON). A read that does
    not show the write (503 projection_behind after wait_ms, or an older
    version) is counted in errors and enters the percentiles with the time it
    took, a lower bound.
Tokens come from DAYBOOK_BENCH_WRITE_TOKEN and DAYBOOK_BENCH_READ_TOKEN."""
import json, os, random, sys, time
from urllib.parse import quote

from kstamp import UNSTAMPED, Client

WRITE = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_WRITE_TOKEN"],
         "Content-Type": "application/json"}
READ = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_READ_TOKEN"]}


def deposit(command, accounts):
    """(account, version, position, status, the 201's arrival ns, the request's sending ns,
    the ns when this process had read it)"""
    account = "a%d" % random.randrange(accounts)
    status, body, arrived, sent = command.call("POST", "/accounts/%s/deposits" % account,
                                               '{"amount":1,"reference":"freshness"}', WRITE)
    seen = time.time_ns()
    arrived = arrived or sent  # no kernel time: the earliest it can have been
    if status != 201:
        return account, None, None, status, arrived, sent, seen
    answer = json.loads(body)
    return account, answer["version"], answer["position"], status, arrived, sent, seen


def read_at(query, account, position, wait_ms):
    """(status, version shown, the answer's arrival ns, the request's sending ns, the ns
    when this process had read it)"""
    status, body, arrived, sent = query.call(
        "GET", "/accounts/%s?min_position=%s&wait_ms=%d"
        % (account, quote(position, safe=""), wait_ms), None, READ)
    seen = time.time_ns()
    arrived = arrived or seen  # no kernel time: the latest it can have been
    version = json.loads(body).get("version") if status == 200 else None
    return status, version, arrived, sent, seen


def percentile(sorted_values, p):
    """The nearest-rank percentile of nanoseconds, in ms."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))
    return round(sorted_values[int(rank) - 1] / 1e6, 3)


def barrier(cmd_port, query_port, accounts, timeout_s):
    command, query = Client(int(cmd_port)), Client(int(query_port))
    account, version, position, status = deposit(command, int(accounts))[:4]
    if version is None:
        sys.exit("barrier: the deposit answered %s" % status)
    deadline = time.monotonic() + float(timeout_s)
    while time.monotonic() < deadline:
        try:
            status, seen = read_at(query, account, position, 10000)[:2]
        except (OSError, ValueError):
            status, seen = None, None
            time.sleep(0.5)
        if status == 200 and seen is not None and seen >= version:
            return
        if status not in (200, 503, None):
            sys.exit("barrier: GET /accounts/%s answered %s" % (account, status))
    sys.exit("barrier: not visible after %s s" % timeout_s)


def sample(cmd_port, query_port, accounts, seconds, interval_ms, out):
    """Every sample runs from the kernel's receive time of the deposit's 201 to that of
    the read showing it. Besides: `sampler_*` the same span as this process saw it
    (after being scheduled and reading; what this sampler measured before kernel
    stamps), `react_*` how long after the 201's arrival the read was sent (a sample
    is at least that long), `write_*` the deposit's own round trip."""
    command, query = Client(int(cmd_port)), Client(int(query_port))
    accounts, interval = int(accounts), float(interval_ms) / 1000
    lags, seen_lags, reacts, writes, errors = [], [], [], [], {}
    end = time.monotonic() + float(seconds)
    next_at = time.monotonic()
    while time.monotonic() < end:
        account, version, position, status, written, sent, written_seen = \
            deposit(command, accounts)
        if version is None:
            errors["deposit %s" % status] = errors.get("deposit %s" % status, 0) + 1
        else:
            writes.append(written - sent)
            status, shown, visible, asked, visible_seen = read_at(query, account, position, 1000)
            ok = status == 200 and shown is not None and shown >= version
            if not ok:
                key = "read %s" % status if status != 200 else "read stale version"
                errors[key] = errors.get(key, 0) + 1
            # not visible within wait_ms: counted too, as a lower bound
            if ok or status in (200, 503):
                lags.append(visible - written)
                seen_lags.append(visible_seen - written_seen)
                reacts.append(asked - written)
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.monotonic()
    for values in (lags, seen_lags, reacts, writes):
        values.sort()
    with open(out, "w") as f:
        json.dump({"samples": len(lags), "p50_ms": percentile(lags, 50),
                   "p99_ms": percentile(lags, 99), "max_ms": percentile(lags, 100),
                   "sampler_p50_ms": percentile(seen_lags, 50),
                   "sampler_p99_ms": percentile(seen_lags, 99),
                   "react_p50_ms": percentile(reacts, 50), "react_p99_ms": percentile(reacts, 99),
                   "write_p50_ms": percentile(writes, 50), "write_p99_ms": percentile(writes, 99),
                   "unstamped_reads": UNSTAMPED[0], "errors": errors}, f)


if __name__ == "__main__":
    {"barrier": barrier, "sample": sample}[sys.argv[1]](*sys.argv[2:])
