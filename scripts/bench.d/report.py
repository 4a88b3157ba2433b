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


LAG_TARGET_S = 1


def lsn(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def checkpoints(name):
    """Checkpoints begun between wal-NAME-start and -end."""
    return load("wal-%s-end" % name)["checkpoints"] - load("wal-%s-start" % name)["checkpoints"]


def wal_per_op(name, ops):
    """(WAL bytes per operation, checkpoints started) between wal-NAME-start and -end."""
    a, b = load("wal-%s-start" % name), load("wal-%s-end" % name)
    per = round((lsn(b["lsn"]) - lsn(a["lsn"])) / ops) if ops > 0 else None
    return per, checkpoints(name)


def writes(a):
    """Uniform (kind writes) or hot-spot (kind hotspot) transfers, the stack up."""
    kind, target = a["kind"], float(a["target"])
    d, p, lag = load(kind), load("pgbench-" + kind), load(kind + "-lag")
    rate, anchor = wrk_rate(d), p["tps"]
    ratio = rate / anchor if anchor else None
    hwm = int(a["command_hwm_kb"])
    ok_ratio = ratio is not None and ratio >= target
    ok_lag = lag["seconds"] < LAG_TARGET_S
    print("%s: POST /transfers among %s accounts, %s connections, %s s, the whole stack "
          "running; durable PostgreSQL (fsync=%s, synchronous_commit=%s)"
          % (kind, a["accounts"], a["connections"], a["duration"], a["fsync"], a["sync_commit"]))
    row("", "tx/s", "p50 ms", "p99 ms")
    row("daybook (whole stack)", round(rate, 1), ms(d["p50_us"]), ms(d["p99_us"]))
    row("pgbench (plain-SQL transfer)", round(anchor, 1), None, None)
    row("ratio", "%.2fx" % ratio if ratio else "n/a",
        "target >= %gx: %s" % (target, verdict(ok_ratio)), widths=(30, 12, 30))
    row("projector lag at the end", "%d events" % lag["events"],
        "%.3f s behind (target < %d s): %s" % (lag["seconds"], LAG_TARGET_S, verdict(ok_lag)),
        widths=(30, 12, 50))
    row("projector catch-up after", "%.3f s" % lag["catch_up_s"], widths=(30, 12))
    row("daybook non-2xx", d["non2xx"], "socket errors %d" % wrk_errors(d), widths=(30, 12, 30))
    row("pgbench failed transactions", p["failed"], "latency avg %.2f ms" % p["latency_ms"],
        widths=(30, 12, 30))
    wal_d, wal_p = wal_per_op(kind, d["requests"] - d["non2xx"]), \
        wal_per_op("pgbench-" + kind, p["transactions"])
    row("WAL bytes per transfer", wal_d[0], "pgbench %s" % wal_p[0], widths=(30, 12, 30))
    row("checkpoints begun in the run", wal_d[1], "pgbench: %s" % wal_p[1],
        widths=(30, 12, 30))
    row("daybook-command VmHWM", "%.1f MiB" % (hwm / 1024),
        "target <= 64 MiB: %s" % verdict(hwm <= 65536), widths=(30, 12, 30))
    print(json.dumps({
        "bench": kind, "accounts": int(a["accounts"]), "connections": int(a["connections"]),
        "duration_s": int(a["duration"]), "daybook_tps": round(rate, 1),
        "pgbench_tps": round(anchor, 1), "ratio": round(ratio, 3) if ratio else None,
        "target_ratio": target, "projector_lag_events": lag["events"],
        "projector_lag_s": lag["seconds"], "projector_catch_up_s": lag["catch_up_s"],
        "target_lag_s": LAG_TARGET_S, "pass": bool(ok_ratio and ok_lag),
        "daybook_p50_ms": ms(d["p50_us"]), "daybook_p99_ms": ms(d["p99_us"]),
        "daybook_requests": d["requests"], "daybook_non2xx": d["non2xx"],
        "daybook_socket_errors": wrk_errors(d), "pgbench_failed": p["failed"],
        "pgbench_latency_avg_ms": p["latency_ms"], "command_vmhwm_kib": hwm,
        "daybook_wal_bytes_per_transfer": wal_d[0], "pgbench_wal_bytes_per_transfer": wal_p[0],
        "daybook_checkpoints": wal_d[1], "pgbench_checkpoints": wal_p[1],
        "fsync": a["fsync"], "synchronous_commit": a["sync_commit"]}))


def reads(a):
    rounds = []
    for r in range(1, int(a.get("rounds", 1)) + 1):
        suffix = "" if r == 1 else "-%d" % r
        d, n = load("reads" + suffix), load("nginx" + suffix)
        rate, anchor = wrk_rate(d), wrk_rate(n)
        rounds.append({"daybook": d, "nginx": n, "rate": rate, "anchor": anchor,
                       "ratio": rate / anchor if anchor else None,
                       "p99_ratio": d["p99_us"] / n["p99_us"] if n["p99_us"] else None})
    # The medians of the rounds: of each side's rate and p99, and of the rounds' ratios
    # (the targets' measure: each ratio compares two runs minutes apart at most).
    med = statistics.median
    ratios = [x["ratio"] for x in rounds if x["ratio"] is not None]
    p99_ratios = [x["p99_ratio"] for x in rounds if x["p99_ratio"] is not None]
    ratio = med(ratios) if ratios else None
    p99_ratio = med(p99_ratios) if p99_ratios else None
    rate, anchor = med(x["rate"] for x in rounds), med(x["anchor"] for x in rounds)
    d_p99 = med(x["daybook"]["p99_us"] for x in rounds)
    n_p99 = med(x["nginx"]["p99_us"] for x in rounds)
    d_p50 = med(x["daybook"]["p50_us"] for x in rounds)
    n_p50 = med(x["nginx"]["p50_us"] for x in rounds)
    ok_rate = ratio is not None and ratio >= 0.8
    ok_p99 = p99_ratio is not None and p99_ratio <= 1
    non2xx = sum(x["daybook"]["non2xx"] for x in rounds)
    errors = sum(wrk_errors(x["daybook"]) for x in rounds)
    print("reads: GET /accounts/{id}, %s random accounts, %s connections, %s s; "
          "body %s bytes; the median of %d rounds" % (a["accounts"], a["connections"],
                                                      a["duration"], a["body_bytes"],
                                                      len(rounds)))
    row("", "req/s", "p50 ms", "p99 ms")
    for i, x in enumerate(rounds, 1):
        row("round %d daybook-query" % i, round(x["rate"], 1), ms(x["daybook"]["p50_us"]),
            ms(x["daybook"]["p99_us"]))
        row("round %d nginx" % i, round(x["anchor"], 1), ms(x["nginx"]["p50_us"]),
            ms(x["nginx"]["p99_us"]))
    row("daybook-query (median)", round(rate, 1), ms(d_p50), ms(d_p99))
    row("nginx (static file)", round(anchor, 1), ms(n_p50), ms(n_p99))
    row("req/s ratio", "%.2fx" % ratio if ratio else "n/a",
        "target >= 0.8x: %s" % verdict(ok_rate), widths=(30, 12, 30))
    row("p99 ratio", "%.2fx" % p99_ratio if p99_ratio else "n/a",
        "target <= 1x: %s" % verdict(ok_p99), widths=(30, 12, 30))
    row("daybook non-2xx", non2xx, "socket errors %d" % errors, widths=(30, 12, 30))
    print(json.dumps({
        "bench": "reads", "connections": int(a["connections"]), "duration_s": int(a["duration"]),
        "body_bytes": int(a["body_bytes"]), "rounds": len(rounds),
        "daybook_rps": round(rate, 1), "nginx_rps": round(anchor, 1),
        "rps_ratio": round(ratio, 3) if ratio else None,
        "daybook_p99_ms": ms(d_p99), "nginx_p99_ms": ms(n_p99),
        "p99_ratio": round(p99_ratio, 3) if p99_ratio else None,
        "round_rps_ratios": [round(x, 3) for x in ratios],
        "round_p99_ratios": [round(x, 3) for x in p99_ratios],
        "target_rps_ratio": 0.8, "target_p99_ratio": 1, "pass": ok_rate and ok_p99,
        "daybook_non2xx": non2xx, "daybook_socket_errors": errors,
        "nginx_non2xx": sum(x["nginx"]["non2xx"] for x in rounds),
        "query_vmhwm_kib": int(a["query_hwm_kb"]),
        "projector_vmhwm_kib": int(a["projector_hwm_kb"])}))


def freshness(a):
    f, load_result = load("freshness"), load("freshness-load")
    achieved = wrk_rate(load_result)
    cps = checkpoints("freshness")
    ok = f["p99_ms"] is not None and f["p99_ms"] <= 5
    print("freshness: 201 -> visible in GET /accounts/{id}?min_position (wait_ms=1000), "
          "%s samples" % f["samples"])
    print("  background transfers: target %s/s (half of %s/s), achieved %.1f/s, non-2xx %d"
          % (a["rate"], a["max_rate"], achieved, load_result["non2xx"]))
    if achieved < 0.9 * float(a["rate"]):
        print("  (the background load fell short of its target rate)")
    row("", "p50 ms", "p99 ms", "max ms")
    row("201 -> visible", f["p50_ms"], f["p99_ms"], f["max_ms"])
    row("  as the sampler saw it", f["sampler_p50_ms"], f["sampler_p99_ms"], None)
    row("  201 -> the read sent", f["react_p50_ms"], f["react_p99_ms"], None)
    row("the write itself (201)", f["write_p50_ms"], f["write_p99_ms"], None)
    row("p99 target <= 5 ms", verdict(ok), "checkpoints begun while sampling: %d" % cps,
        widths=(30, 12, 40))
    if f["errors"]:
        row("errors", json.dumps(f["errors"]), widths=(30, 50))
    print(json.dumps({
        "bench": "freshness", "samples": f["samples"], "p50_ms": f["p50_ms"],
        "p99_ms": f["p99_ms"], "max_ms": f["max_ms"], "target_p99_ms": 5, "pass": ok,
        "stamps": "kernel receive times", "sampler_rt": a.get("sampler_rt") == "1",
        "sampler_p50_ms": f["sampler_p50_ms"], "sampler_p99_ms": f["sampler_p99_ms"],
        "react_p50_ms": f["react_p50_ms"], "react_p99_ms": f["react_p99_ms"],
        "unstamped_reads": f.get("unstamped_reads", 0), "checkpoints": cps,
        "errors": f["errors"], "background_target_tps": float(a["rate"]),
        "background_achieved_tps": round(achieved, 1), "background_non2xx": load_result["non2xx"],
        "query_vmhwm_kib": int(a["query_hwm_kb"]),
        "projector_vmhwm_kib": int(a["projector_hwm_kb"])}))


def rebuild(a):
    copies = [float(x) for x in a["copy_runs"].split()]
    rebuilds = [float(x) for x in a["rebuild_runs"].split()]
    copy_s, rebuild_s = statistics.median(copies), statistics.median(rebuilds)
    ratio = rebuild_s / copy_s if copy_s else None
    ok = ratio is not None and ratio <= 2
    print("rebuild: %s events, the median of %d rounds" % (a["events"], len(rebuilds)))
    row("", "seconds", "events/s")
    row("daybook-admin rebuild all", round(rebuild_s, 2), round(int(a["events"]) / rebuild_s))
    row("COPY events TO STDOUT", round(copy_s, 2), round(int(a["events"]) / copy_s))
    row("ratio", "%.2fx" % ratio if ratio else "n/a", "target <= 2x: %s" % verdict(ok),
        widths=(30, 12, 30))
    # CPU of each round: COPY's (PostgreSQL and psql), the rebuild's (PostgreSQL,
    # daybook-admin, Redis); medians of each part.
    copy_cpu = [int(x) for x in a.get("copy_cpu_ms", "").split()]
    parts = [[int(p) for p in x.split(",")] for x in a.get("rebuild_cpu_ms", "").split()]
    cpu = {}
    if copy_cpu and parts:
        cpu = {"copy_ms": statistics.median(copy_cpu),
               "pg_ms": statistics.median(p[0] for p in parts),
               "admin_ms": statistics.median(p[1] for p in parts),
               "redis_ms": statistics.median(p[2] for p in parts),
               "rebuild_ms": statistics.median(sum(p) for p in parts)}
        cpu["ratio"] = round(cpu["rebuild_ms"] / cpu["copy_ms"], 3) if cpu["copy_ms"] else None
        print("  CPU ms: COPY %d; rebuild %d (PostgreSQL %d, daybook-admin %d, Redis %d): %s" % (
            cpu["copy_ms"], cpu["rebuild_ms"], cpu["pg_ms"], cpu["admin_ms"], cpu["redis_ms"],
            "%.2fx" % cpu["ratio"] if cpu["ratio"] else "n/a"))
    # After each rebuild returned: how long until the old Redis generation was gone
    # (the projector's sweep, when one leads) and Redis's CPU meanwhile.
    sweeps = [float(x) for x in a.get("sweep_after_s", "").split()]
    sweep_cpu = [int(x) for x in a.get("sweep_redis_cpu_ms", "").split()]
    if sweeps:
        print("  old generation gone after the rebuild returned: %s s (Redis CPU ms %s)" % (
            " ".join("%.2f" % x for x in sweeps), " ".join(str(x) for x in sweep_cpu)))
    print(json.dumps({
        "bench": "rebuild", "events": int(a["events"]), "rebuild_s": round(rebuild_s, 3),
        "copy_s": round(copy_s, 3), "ratio": round(ratio, 3) if ratio else None,
        "rebuild_runs_s": [round(x, 3) for x in rebuilds],
        "copy_runs_s": [round(x, 3) for x in copies],
        "cpu_ms": cpu, "sweep_after_s": sweeps, "sweep_redis_cpu_ms": sweep_cpu,
        "target_ratio": 2, "pass": ok}))


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
    cps = checkpoints("feed-live")
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
    row("  as the sampler saw it", live["sampler_p50_ms"], live["sampler_p99_ms"], None)
    row("p99 target < 10 ms", verdict(ok_live), "missing frames %d, checkpoints begun "
        "while sampling %d" % (live["missing"], cps), widths=(30, 12, 50))
    print(json.dumps({
        "bench": "feed", "events": events, "page_s": round(page_s, 3),
        "copy_s": round(copy_s, 3), "rate_ratio": round(ratio, 3) if ratio else None,
        "target_rate_ratio": 0.25, "page_runs_s": [round(x, 3) for x in pages],
        "copy_runs_s": [round(x, 3) for x in copies], "streams": live["streams"],
        "live_samples": live["samples"], "live_p50_ms": live["p50_ms"],
        "live_p99_ms": live["p99_ms"], "live_max_ms": live["max_ms"],
        "live_missing": live["missing"], "target_live_p99_ms": 10,
        "live_stamps": "kernel receive times", "live_sampler_p50_ms": live["sampler_p50_ms"],
        "live_sampler_p99_ms": live["sampler_p99_ms"],
        "live_unstamped_reads": live.get("unstamped_reads", 0), "live_checkpoints": cps,
        "background_target_tps": float(a["rate"]),
        "background_achieved_tps": round(achieved, 1),
        "query_vmhwm_kib": int(a["query_hwm_kb"]), "pass": ok_rate and ok_live}))


def redis_table(r, prefix):
    if not r.get("live"):
        row(prefix + "Redis", "no live generation", widths=(30, 30))
        return
    row(prefix + "Redis bytes per account", r["bytes_per_account"],
        "MEMORY USAGE of %d account hashes" % r["sampled_accounts"], widths=(30, 12, 40))
    row(prefix + "Redis bytes per stmt item", r["bytes_per_statement_item"],
        "over %d statement items" % r["statement_items_sampled"], widths=(30, 12, 40))
    if r.get("bytes_per_transfer"):
        row(prefix + "Redis bytes per transfer", r["bytes_per_transfer"],
            "MEMORY USAGE of %d transfer keys" % r["transfers_sampled"], widths=(30, 12, 40))
    row(prefix + "Redis used_memory", "%.1f MiB" % (r["used_memory"] / 1048576),
        "%d keys" % r["keys"], widths=(30, 12, 40))


def memory(a):
    services = {}
    for item in a["services"].split():
        name, kb, when = item.split(":", 2)
        services[name] = {"vmhwm_kib": int(kb), "after": when, "pass": int(kb) <= 65536}
    r = load("redis-bytes")
    print("memory: peak resident set (VmHWM) of each service after its load; Redis over %s "
          "accounts" % a["accounts"])
    row("", "VmHWM", "after", widths=(30, 12, 18))
    for name, s in services.items():
        row("daybook-" + name, "%.1f MiB" % (s["vmhwm_kib"] / 1024), s["after"],
            "target <= 64 MiB: %s" % verdict(s["pass"]), widths=(30, 12, 18, 30))
    redis_table(r, "")
    print(json.dumps({"bench": "memory", "target_mib": 64, "services": services,
                      "redis": r, "pass": all(s["pass"] for s in services.values())}))


def machine(a):
    """The header of `all`: the fsync rate pg_test_fsync measured, cores, load."""
    rates = {}
    section = None
    for line in open(a["fsync_log"]):
        if line.startswith("Compare file sync methods using one"):
            section = "one"
        elif line.startswith("Compare") or line.startswith("Non-sync"):
            section = None
        elif section == "one":
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "ops/sec":
                try:
                    rates[parts[0]] = float(parts[1])
                except ValueError:
                    pass  # "n/a*"
    fsync = rates.get("fdatasync") or rates.get("fsync")
    print("machine: %s cores, load %s, PostgreSQL %s, commit %s" % (
        a["cores"], a["load"], a["pg_version"], a["commit"]))
    print("  fsync rate (pg_test_fsync, one 8 kB write): %s" % (
        ", ".join("%s %.0f/s" % (k, v) for k, v in rates.items()) or "not measured"))
    print(json.dumps({"bench": "machine", "cores": int(a["cores"]), "load": a["load"],
                      "pg_version": a["pg_version"], "commit": a["commit"],
                      "fdatasync_per_s": round(fsync) if fsync else None,
                      "sync_methods_per_s": {k: round(v) for k, v in rates.items()},
                      "target": None, "pass": None}))


def scale(a):
    accounts, events = int(a["accounts"]), int(a["events"])
    cq, cr = load("scale-cold-query"), load("scale-cold-redis")
    r, reads = load("scale-redis"), load("scale-reads")
    rebuild_s, copy_s = float(a["rebuild_s"]), float(a["copy_s"])
    ratio = rebuild_s / copy_s if copy_s else None
    catch = float(a["catch_up_s"])
    catch_rate = int(a["caught_up_events"]) / catch if catch else None
    ok_verify = a["verify_status"] == "0"
    print("scale: %d accounts, %d events (seeded with SQL in %s s)" % (accounts, events, a["seed_s"]))
    row("", "seconds", "events/s", widths=(36, 12, 12))
    row("projector catch-up (%s events)" % a["caught_up_events"], round(catch, 2),
        round(catch_rate) if catch_rate else "n/a", widths=(36, 12, 12))
    row("daybook-admin rebuild all", round(rebuild_s, 2), round(events / rebuild_s),
        widths=(36, 12, 12))
    row("COPY events TO STDOUT", round(copy_s, 2), round(events / copy_s), widths=(36, 12, 12))
    row("rebuild / COPY", "%.2fx" % ratio if ratio else "n/a", "(SPEC: <= 2x at 1M events)",
        widths=(36, 12, 30))
    row("daybook-admin verify", float(a["verify_s"]),
        "exit %s: %s" % (a["verify_status"], verdict(ok_verify)), widths=(36, 12, 30))
    row("Redis resync after a restart", float(a["resync_s"]), widths=(36, 12))
    row("", "p50 ms", "p99 ms", "first ms", widths=(36, 12, 12, 12))
    row("cold reads, query restarted", cq["p50_ms"], cq["p99_ms"], cq["first_ms"],
        widths=(36, 12, 12, 12))
    row("cold reads, Redis restarted empty", cr["p50_ms"], cr["p99_ms"], cr["first_ms"],
        widths=(36, 12, 12, 12))
    row("reads, %s conns, after" % a["connections"], ms(reads["p50_us"]), ms(reads["p99_us"]),
        "%.0f req/s" % wrk_rate(reads), widths=(36, 12, 12, 12))
    pg_per_event = int(a["pg_events_bytes"]) / events
    row("PostgreSQL bytes per event", round(pg_per_event), "(events table with indexes)",
        widths=(36, 12, 30))
    redis_table(r, "")
    print(json.dumps({
        "bench": "scale", "accounts": accounts, "events": events, "seed_s": float(a["seed_s"]),
        "projector_catch_up_events": int(a["caught_up_events"]), "projector_catch_up_s": catch,
        "projector_catch_up_events_per_s": round(catch_rate) if catch_rate else None,
        "rebuild_s": rebuild_s, "copy_s": copy_s, "rebuild_copy_ratio": round(ratio, 3) if ratio else None,
        "verify_s": float(a["verify_s"]), "verify_ok": ok_verify, "redis_resync_s": float(a["resync_s"]),
        "cold_query_restart": cq, "cold_redis_restart": cr,
        "reads_rps": round(wrk_rate(reads), 1), "reads_p99_ms": ms(reads["p99_us"]),
        "pg_bytes_per_event": round(pg_per_event), "redis": r,
        "target": "verify passes (rebuild, verify and cold-read p99 are reported)",
        "pass": ok_verify}))


def skipped(a):
    print("%s: skipped: %s" % (a["bench"], a["reason"]))
    print(json.dumps({"bench": a["bench"], "skipped": a["reason"]}))


if __name__ == "__main__":
    args = dict(arg.split("=", 1) for arg in sys.argv[2:])
    globals()[sys.argv[1]](args)
    sys.stdout.flush()
