"""Feed clients of scripts/bench.

page QUERY_PORT OUT
    page through GET /events?limit=1000 from the beginning until a page comes
    back empty, on one keep-alive connection; writes {"seconds","events"} and
    each page's time ("page_p50_ms", "page_p99_ms", "page_max_ms", and the mean
    of the first and of the last tenth of the pages: a plan that reads the rest
    of the log on every page shows as pages that get faster towards the end).
live CMD_PORT QUERY_PORT STREAMS SECONDS INTERVAL_MS OUT
    open STREAMS SSE streams following account-feedmark from the log head, then
    every INTERVAL_MS deposit 1 cent into feedmark (a thread) and take, for each
    stream, the time from the kernel's receive time of the deposit's 201 to that
    of its frame (kstamp.py). Percentiles to OUT.
Tokens come from DAYBOOK_BENCH_WRITE_TOKEN and DAYBOOK_BENCH_READ_TOKEN."""
import http.client, json, os, re, selectors, socket, sys, threading, time

from kstamp import UNSTAMPED, Client, recv_stamped, stamping

WRITE = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_WRITE_TOKEN"],
         "Content-Type": "application/json"}
READ = {"Authorization": "Bearer " + os.environ["DAYBOOK_BENCH_READ_TOKEN"]}
NEXT = re.compile(rb'"next_after":"([0-9.]+)"}$')


def page(port, out):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    after, events, start = "0.0", 0, time.perf_counter()
    took = []
    while True:
        t0 = time.perf_counter()
        conn.request("GET", "/events?limit=1000&after=" + after, None, READ)
        r = conn.getresponse()
        body = r.read()
        took.append(time.perf_counter() - t0)
        if r.status != 200:
            sys.exit("page: GET /events answered %d: %r" % (r.status, body[:200]))
        n = body.count(b'{"position":"')
        events += n
        after = NEXT.search(body).group(1).decode()
        if n == 0:
            break
    seconds = time.perf_counter() - start
    tenth = max(1, len(took) // 10)
    ordered = sorted(took)
    json.dump({"seconds": seconds, "events": events, "pages": len(took),
               "page_p50_ms": percentile(ordered, 50), "page_p99_ms": percentile(ordered, 99),
               "page_max_ms": percentile(ordered, 100),
               "first_tenth_ms": round(sum(took[:tenth]) / tenth * 1000, 3),
               "last_tenth_ms": round(sum(took[-tenth:]) / tenth * 1000, 3)}, open(out, "w"))


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))
    return round(sorted_values[int(rank) - 1] * 1000, 3)


def live(cmd_port, query_port, streams, seconds, interval_ms, out):
    """Each sample runs from the kernel's receive time of a deposit's 201 to that of the
    segment holding its frame on one stream (kstamp.py): the writer thread and the
    selector loop share Python's lock, and their own scheduling is not Daybook's.
    `sampler_*` is the same span as this process saw it (what this sampler measured
    before kernel stamps)."""
    command = Client(int(cmd_port))
    status, body, _, _ = command.call("POST", "/accounts",
                                      '{"id":"feedmark","name":"M","currency":"EUR"}', WRITE)
    head = json.loads(body).get("position", "0.0") if status == 201 else "0.0"
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(int(streams)):
        s = socket.create_connection(("127.0.0.1", int(query_port)))
        stamping(s)
        s.sendall(("GET /events/stream?stream=account-feedmark HTTP/1.0\r\n"
                   "Authorization: %s\r\nLast-Event-ID: %s\r\n\r\n"
                   % (READ["Authorization"], head)).encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [i, b""])
        socks.append(s)
    written, arrived = {}, {}
    stop = threading.Event()

    def writer():
        interval = float(interval_ms) / 1000
        end = time.monotonic() + float(seconds)
        while time.monotonic() < end:
            status, body, at, sent = command.call("POST", "/accounts/feedmark/deposits",
                                                  '{"amount":1,"reference":"feed"}', WRITE)
            seen = time.time_ns()
            at = at or sent  # no kernel time: the earliest it can have been
            if status == 201:
                written[json.loads(body)["position"]] = (at, seen)
            time.sleep(interval)
        time.sleep(1)
        stop.set()

    th = threading.Thread(target=writer)
    th.start()
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            data, at = recv_stamped(key.fileobj)
            seen = time.time_ns()
            at = at or seen  # no kernel time: the latest it can have been
            if not data:
                sel.unregister(key.fileobj)
                continue
            # A frame counts once, when its end (the blank line) has arrived: the
            # segment completing it carries its time; a partial frame waits in the
            # stream's leftover and is looked at again with the rest.
            buf = key.data[1] + data
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                key.data[1] = buf
                continue
            for m in re.finditer(rb"id: ([0-9.]+)\n", buf[:cut + 2]):
                arrived.setdefault(m.group(1).decode(), []).append((at, seen))
            key.data[1] = buf[cut + 2:]
    th.join()
    lags, seen_lags, missing = [], [], 0
    for pos, (at0, seen0) in written.items():
        ts = arrived.get(pos, [])
        missing += int(streams) - len(ts)
        lags.extend(max(0, at - at0) / 1e9 for at, _ in ts)
        seen_lags.extend(max(0, seen - seen0) / 1e9 for _, seen in ts)
    lags.sort()
    seen_lags.sort()
    for s in socks:
        s.close()
    json.dump({"streams": int(streams), "samples": len(lags), "missing": missing,
               "p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99),
               "max_ms": percentile(lags, 100), "sampler_p50_ms": percentile(seen_lags, 50),
               "sampler_p99_ms": percentile(seen_lags, 99), "unstamped_reads": UNSTAMPED[0]},
              open(out, "w"))


if __name__ == "__main__":
    {"page": page, "live": live}[sys.argv[1]](*sys.argv[2:])
