"""Reads pgbench's output (LOG) and writes {"tps","failed","latency_ms","transactions"} to OUT: LOG OUT."""
import json, re, sys
text = open(sys.argv[1]).read()
tps = re.search(r"^tps = ([0-9.]+)", text, re.M)
failed = re.search(r"^number of failed transactions: (\d+)", text, re.M)
done = re.search(r"^number of transactions actually processed: (\d+)", text, re.M)
latency = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
if not tps:
    sys.exit("no tps in pgbench output")
json.dump({"tps": float(tps.group(1)), "failed": int(failed.group(1)) if failed else 0,
           "latency_ms": float(latency.group(1)) if latency else 0.0,
           "transactions": int(done.group(1)) if done else 0}, open(sys.argv[2], "w"))
