"""CPU budget of a profiled scripts/bench run: DIR NAME [WRK_RESULT].
Reads DIR/NAME-<process>.stat (perf stat -x, -e task-clock) and, if given, the
wrk result of the run (its request count): prints each process's CPU time and
the microseconds of CPU per operation (task-clock / operations), then each
process's microseconds split by shared object (kernel, libevent, jansson,
libpq, hiredis, the binary, plpgsql, ...) from DIR/NAME-<process>.txt."""
import glob, json, os, re, sys

DSO_LINE = re.compile(r"^\s+([0-9.]+)%\s+(\S.*?)\s*$")


def dso_shares(path):
    """The first table of NAME-PROC.txt (perf report --sort dso): {dso: percent}."""
    shares = {}
    if not os.path.exists(path):
        return shares
    for line in open(path):
        if line.startswith("# Overhead  Command"):
            break
        m = DSO_LINE.match(line)
        if m:
            shares[m.group(2)] = float(m.group(1))
    return shares


def task_clock_ms(path):
    for line in open(path):
        parts = line.strip().split(",")
        if len(parts) >= 3 and parts[2].startswith("task-clock"):
            try:
                return float(parts[0])
            except ValueError:
                return None
    return None


def main(folder, name, result=""):
    ops = None
    if result and os.path.exists(result):
        r = json.load(open(result))
        ops = r["requests"] - r.get("non2xx", 0)
        seconds = r["duration_us"] / 1e6
    rows, total = [], 0.0
    for path in sorted(glob.glob(os.path.join(folder, name + "-*.stat"))):
        process = os.path.basename(path)[len(name) + 1:-len(".stat")]
        ms = task_clock_ms(path)
        if ms is None:
            continue
        total += ms
        rows.append((process, ms))
    print("profile %s: CPU (perf stat task-clock) per process%s" % (
        name, ", %d operations in %.1f s" % (ops, seconds) if ops else ""))
    print("  %-12s%14s%14s" % ("process", "CPU ms", "us per op" if ops else ""))
    for process, ms in rows + [("total", total)]:
        print("  %-12s%14.1f%14s" % (process, ms, "%.1f" % (ms * 1000 / ops) if ops else ""))
    if ops:
        print("  where each process's time goes (perf samples by shared object), us per op:")
        for process, ms in rows:
            shares = dso_shares(os.path.join(folder, "%s-%s.txt" % (name, process)))
            top = sorted(shares.items(), key=lambda kv: -kv[1])[:6]
            print("  %-12s %s" % (process, ", ".join(
                "%s %.1f" % (dso, ms * 1000 / ops * pct / 100) for dso, pct in top)))
    print(json.dumps({"profile": name, "operations": ops, "cpu_ms": dict(rows),
                      "us_per_op": {p: round(ms * 1000 / ops, 2) for p, ms in rows + [("total", total)]}
                      if ops else None}))


if __name__ == "__main__":
    main(*sys.argv[1:])
