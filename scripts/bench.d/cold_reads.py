"""Cold-cache reads of scripts/bench scale: PORT ACCOUNTS READS OUT.
GET /accounts/a<random> READS times, one request at a time on one keep-alive
connection, from the moment the caches went cold; latency percentiles and the
statuses to OUT (JSON). The token comes from DAYBOOK_BENCH_READ_TOKEN."""
import http.client, json, os, random, sys, time

READ = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_READ_TOKEN"]}


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))  # nearest rank
    return round(sorted_values[int(rank) - 1] * 1000, 3)


def main(port, accounts, reads, out):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    latencies, statuses = [], {}
    for _ in range(int(reads)):
        path = "/accounts/a%d" % random.randrange(int(accounts))
        start = time.perf_counter()
        conn.request("GET", path, None, READ)
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - start)
        statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
    first = round(latencies[0] * 1000, 3) if latencies else None
    latencies.sort()
    with open(out, "w") as f:
        json.dump({"reads": len(latencies), "statuses": statuses, "first_ms": first,
                   "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                   "max_ms": percentile(latencies, 100)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
