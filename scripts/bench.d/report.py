"""Tables and JSON summary lines of scripts/bench."""
import json, os, statistics, sys

RESULTS = os.environ["BENCH_RESULTS"]


def load(name):
    with open(os.path.join(RESULTS, name + ".json")) as f:
        return json.load(f)


def wrk_rate(r):
    """2xx responses per second."""
    return (r["requests"] - r["non2xx"]) / (r["duration_us"] / 1e6)


def wrk_errors(r):
    return r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]


def ms(us):
    return round(us / 1000, 2)


def row(*cells, widths=(30, 12, 10, 10)):
    out = ""
    for cell, width in zip(cells, widths):
        out += str(cell).ljust(width) if cell is not None else " " * width
    print("  " + out.rstrip())


def verdict(ok):
    return "PASS" if ok else "MISS"


def writes(a):
    d, p = load("writes"), load("pgbench")
    rate, anchor = wrk_rate(d), p["tps"]
    ratio = rate / anchor if anchor else None
    hwm = int(a["command_hwm_kb"])
    print("writes: POST /transfers, %s accounts, %s connections, %s s; durable PostgreSQL "
          "(fsync=%s, synchronous_commit=%s)" % (a["accounts"], a["connections"],
                                                 a["duration"], a["fsync"], a["sync_commit"]))
    row("", "tx/s", "p50 ms", "p99 ms")
    row("daybook-command", round(rate, 1), ms(d["p50_us"]), ms(d["p99_us"]))
    row("pgbench (plain-SQL transfer)", round(anchor, 1), None, None)
    row("ratio", "%.2fx" % ratio if ratio else "n/a",
        "target >= 2x: %s" % verdict(ratio is not None and ratio >= 2), widths=(30, 12, 30))
    row("daybook non-2xx", d["non2xx"], "socket errors %d" % wrk_errors(d), widths=(30, 12, 30))
    row("pgbench failed transactions", p["failed"], "latency avg %.2f ms" % p["latency_ms"],
        widths=(30, 12, 30))
    row("daybook-command VmHWM", "%.1f MiB" % (hwm / 1024),
        "target <= 64 MiB: %s" % verdict(hwm <= 65536), widths=(30, 12, 30))
    print(json.dumps({
        "bench": "writes", "accounts": int(a["accounts"]), "connections": int(a["connections"]),
        "duration_s": int(a["duration"]), "daybook_tps": round(rate, 1),
        "pgbench_tps": round(anchor, 1), "ratio": round(ratio, 3) if ratio else None,
        "target_ratio": 2, "pass": bool(ratio and ratio >= 2),
        "daybook_p50_ms": ms(d["p50_us"]), "daybook_p99_ms": ms(d["p99_us"]),
        "daybook_requests": d["requests"], "daybook_non2xx": d["non2xx"],
        "daybook_socket_errors": wrk_errors(d), "pgbench_failed": p["failed"],
        "pgbench_latency_avg_ms": p["latency_ms"], "command_vmhwm_kib": hwm,
        "fsync": a["fsync"], "synchronous_commit": a["sync_commit"]}))


def reads(a):
    d, n = load("reads"), load("nginx")
    rate, anchor = wrk_rate(d), wrk_rate(n)
    ratio = rate / anchor if anchor else None
    p99_ratio = d["p99_us"] / n["p99_us"] if n["p99_us"] else None
    ok_rate = ratio is not None and ratio >= 0.6
    ok_p99 = p99_ratio is not None and p99_ratio <= 1.5
    print("reads: GET /accounts/{id}, %s random accounts, %s connections, %s s; "
          "body %s bytes" % (a["accounts"], a["connections"], a["duration"], a["body_bytes"]))
    row("", "req/s", "p50 ms", "p99 ms")
    row("daybook-query", round(rate, 1), ms(d["p50_us"]), ms(d["p99_us"]))
    row("nginx (static file)", round(anchor, 1), ms(n["p50_us"]), ms(n["p99_us"]))
    row("req/s ratio", "%.2fx" % ratio if ratio else "n/a",
        "target >= 0.6x: %s" % verdict(ok_rate), widths=(30, 12, 30))
    row("p99 ratio", "%.2fx" % p99_ratio if p99_ratio else "n/a",
        "target <= 1.5x: %s" % verdict(ok_p99), widths=(30, 12, 30))
    row("daybook non-2xx", d["non2xx"], "socket errors %d" % wrk_errors(d), widths=(30, 12, 30))
    print(json.dumps({
        "bench": "reads", "connections": int(a["connections"]), "duration_s": int(a["duration"]),
        "body_bytes": int(a["body_bytes"]), "daybook_rps": round(rate, 1),
        "nginx_rps": round(anchor, 1), "rps_ratio": round(ratio, 3) if ratio else None,
        "daybook_p99_ms": ms(d["p99_us"]), "nginx_p99_ms": ms(n["p99_us"]),
        "p99_ratio": round(p99_ratio, 3) if p99_ratio else None,
        "target_rps_ratio": 0.6, "target_p99_ratio": 1.5, "pass": ok_rate and ok_p99,
        "daybook_non2xx": d["non2xx"], "daybook_socket_errors": wrk_errors(d),
        "nginx_non2xx": n["non2xx"], "query_vmhwm_kib": int(a["query_hwm_kb"]),
        "projector_vmhwm_kib": int(a["projector_hwm_kb"])}))


def freshness(a):
    f, load_result = load("freshness"), load("freshness-load")
    achieved = wrk_rate(load_result)
    ok = f["p99_ms"] is not None and f["p99_ms"] <= 10
    print("freshness: 201 -> visible in GET /accounts/{id}?min_position (wait_ms=1000), "
          "%s samples" % f["samples"])
    print("  background transfers: target %s/s (half of %s/s), achieved %.1f/s, non-2xx %d"
          % (a["rate"], a["max_rate"], achieved, load_result["non2xx"]))
    if achieved < 0.9 * float(a["rate"]):
        print("  (the background load fell short of its target rate)")
    row("", "p50 ms", "p99 ms", "max ms")
    row("201 -> visible", f["p50_ms"], f["p99_ms"], f["max_ms"])
    row("the write itself (201)", f["write_p50_ms"], f["write_p99_ms"], None)
    row("p99 target <= 10 ms", verdict(ok), widths=(30, 12))
    if f["errors"]:
        row("errors", json.dumps(f["errors"]), widths=(30, 50))
    print(json.dumps({
        "bench": "freshness", "samples": f["samples"], "p50_ms": f["p50_ms"],
        "p99_ms": f["p99_ms"], "max_ms": f["max_ms"], "target_p99_ms": 10, "pass": ok,
        "errors": f["errors"], "background_target_tps": float(a["rate"]),
        "background_achieved_tps": round(achieved, 1), "background_non2xx": load_result["non2xx"],
        "query_vmhwm_kib": int(a["query_hwm_kb"]),
        "projector_vmhwm_kib": int(a["projector_hwm_kb"])}))


def rebuild(a):
    copies = [float(x) for x in a["copy_runs"].split()]
    rebuilds = [float(x) for x in a["rebuild_runs"].split()]
    copy_s, rebuild_s = statistics.median(copies), statistics.median(rebuilds)
    ratio = rebuild_s / copy_s if copy_s else None
    ok = ratio is not None and ratio <= 4
    print("rebuild: %s events, the median of %d rounds" % (a["events"], len(rebuilds)))
    row("", "seconds", "events/s")
    row("daybook-admin rebuild all", round(rebuild_s, 2), round(int(a["events"]) / rebuild_s))
    row("COPY events TO STDOUT", round(copy_s, 2), round(int(a["events"]) / copy_s))
    row("ratio", "%.2fx" % ratio if ratio else "n/a", "target <= 4x: %s" % verdict(ok),
        widths=(30, 12, 30))
    print(json.dumps({
        "bench": "rebuild", "events": int(a["events"]), "rebuild_s": round(rebuild_s, 3),
        "copy_s": round(copy_s, 3), "ratio": round(ratio, 3) if ratio else None,
        "rebuild_runs_s": [round(x, 3) for x in rebuilds],
        "copy_runs_s": [round(x, 3) for x in copies],
        "target_ratio": 4, "pass": ok}))


def feed(a):
    copies = [float(x) for x in a["copy_runs"].split()]
    pages = [float(x) for x in a["page_runs"].split()]
    copy_s, page_s = statistics.median(copies), statistics.median(pages)
    events = int(a["events"])
    ratio = copy_s / page_s if page_s else None
    ok_rate = ratio is not None and ratio >= 0.25
    live = load("feed-live")
    load_result = load("feed-load")
    achieved = wrk_rate(load_result)
    ok_live = live["p99_ms"] is not None and live["p99_ms"] < 10 and not live["missing"]
    print("feed: catch-up through GET /events?limit=1000 over %d events, the median of %d "
          "rounds" % (events, len(pages)))
    row("", "seconds", "events/s")
    row("GET /events pages", round(page_s, 2), round(events / page_s))
    row("COPY (SELECT ...) TO STDOUT", round(copy_s, 2), round(events / copy_s))
    row("rate ratio", "%.2fx" % ratio if ratio else "n/a",
        "target >= 0.25x: %s" % verdict(ok_rate), widths=(30, 12, 30))
    print("feed: live SSE, %s streams (each following the marker account), marker deposit "
          "201 -> frame, %s samples" % (live["streams"], live["samples"]))
    print("  background transfers: target %s/s (half of %s/s), achieved %.1f/s, non-2xx %d"
          % (a["rate"], a["max_rate"], achieved, load_result["non2xx"]))
    row("", "p50 ms", "p99 ms", "max ms")
    row("201 -> SSE frame", live["p50_ms"], live["p99_ms"], live["max_ms"])
    row("p99 target < 10 ms", verdict(ok_live), "missing frames %d" % live["missing"],
        widths=(30, 12, 30))
    print(json.dumps({
        "bench": "feed", "events": events, "page_s": round(page_s, 3),
        "copy_s": round(copy_s, 3), "rate_ratio": round(ratio, 3) if ratio else None,
        "target_rate_ratio": 0.25, "page_runs_s": [round(x, 3) for x in pages],
        "copy_runs_s": [round(x, 3) for x in copies], "streams": live["streams"],
        "live_samples": live["samples"], "live_p50_ms": live["p50_ms"],
        "live_p99_ms": live["p99_ms"], "live_max_ms": live["max_ms"],
        "live_missing": live["missing"], "target_live_p99_ms": 10,
        "background_target_tps": float(a["rate"]),
        "background_achieved_tps": round(achieved, 1),
        "query_vmhwm_kib": int(a["query_hwm_kb"]), "pass": ok_rate and ok_live}))


def memory(a):
    services = {}
    for item in a["services"].split():
        name, kb, when = item.split(":", 2)
        services[name] = {"vmhwm_kib": int(kb), "after": when, "pass": int(kb) <= 65536}
    print("memory: peak resident set (VmHWM) of each service after its load")
    row("", "VmHWM", "after", widths=(30, 12, 12))
    for name, s in services.items():
        row("daybook-" + name, "%.1f MiB" % (s["vmhwm_kib"] / 1024), s["after"],
            "target <= 64 MiB: %s" % verdict(s["pass"]), widths=(30, 12, 12, 30))
    print(json.dumps({"bench": "memory", "target_mib": 64, "services": services,
                      "pass": all(s["pass"] for s in services.values())}))


def skipped(a):
    print("%s: skipped: %s" % (a["bench"], a["reason"]))
    print(json.dumps({"bench": a["bench"], "skipped": a["reason"]}))


if __name__ == "__main__":
    args = dict(arg.split("=", 1) for arg in sys.argv[2:])
    globals()[sys.argv[1]](args)
    sys.stdout.flush()
