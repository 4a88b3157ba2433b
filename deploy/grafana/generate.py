#!/usr/bin/env python3
"""Generates deploy/grafana/daybook.json (the Grafana dashboard over docs/metrics.md):

    deploy/grafana/generate.py > deploy/grafana/daybook.json

Edit the panels here, regenerate, and commit both; scripts/lint-monitoring checks the
result."""
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
pid = [0]
y = [0]

def row(title):
    pid[0] += 1
    panels.append({"id": pid[0], "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []})
    y[0] += 1

x = [0]
def panel(title, targets, unit="short", w=8, kind="timeseries", desc=""):
    pid[0] += 1
    if x[0] + w > 24:
        x[0] = 0
        y[0] += 8
    p = {"id": pid[0], "type": kind, "title": title, "description": desc, "datasource": DS,
         "gridPos": {"h": 8, "w": w, "x": x[0], "y": y[0]},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                     "tooltip": {"mode": "multi", "sort": "desc"}},
         "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l}
                     for i, (e, l) in enumerate(targets)]}
    if kind == "table":
        p["options"] = {"showHeader": True}
        for t in p["targets"]:
            t["format"] = "table"
            t["instant"] = True
    panels.append(p)
    x[0] += w

def newrow(title):
    if x[0]:
        y[0] += 8
    x[0] = 0
    row(title)

J = '{job=~"$job"}'
def sel(extra=""):
    return '{job=~"$job"' + (", " + extra if extra else "") + "}"
API = 'route!~"/readyz|/healthz|/metrics"'
FIVEXX = sel(API + ', status=~"5.."')
READYZ = sel('route="/readyz"')

newrow("HTTP")
panel("Requests by route and status", [(f'sum by (job, route, status) (rate(daybook_http_requests_total{sel(API)}[$__rate_interval]))', "{{job}} {{route}} {{status}}")], "reqps")
panel("5xx ratio", [(f'sum by (job) (rate(daybook_http_requests_total{FIVEXX}[$__rate_interval])) / sum by (job) (rate(daybook_http_requests_total{sel(API)}[$__rate_interval]))', "{{job}}")], "percentunit")
panel("Latency p99 by route and status", [(f'histogram_quantile(0.99, sum by (job, route, status, le) (rate(daybook_http_request_duration_seconds_bucket{sel(API)}[$__rate_interval])))', "{{job}} {{route}} {{status}}")], "s")
panel("Latency p50 by route", [(f'histogram_quantile(0.5, sum by (job, route, le) (rate(daybook_http_request_duration_seconds_bucket{sel(API)}[$__rate_interval])))', "{{job}} {{route}}")], "s")
panel("Requests in flight", [(f'sum by (job, instance) (daybook_http_requests_in_flight{J})', "{{job}} {{instance}}")])
panel("Connections", [(f'sum by (job, instance) (daybook_http_connections_open{J})', "open {{job}} {{instance}}"), (f'sum by (job, reason) (rate(daybook_http_connections_closed_total{J}[$__rate_interval]))', "closed {{job}} {{reason}}")])
panel("/readyz answers", [(f'sum by (job, instance, status) (rate(daybook_http_requests_total{READYZ}[$__rate_interval]))', "{{job}} {{instance}} {{status}}")], "reqps")

newrow("Writes (daybook-command)")
panel("Events appended", [(f'sum by (instance) (rate(daybook_events_appended_total{J}[$__rate_interval]))', "{{instance}}")], "ops")
panel("Commit latency", [(f'histogram_quantile(0.5, sum by (le) (rate(daybook_append_commit_seconds_bucket{J}[$__rate_interval])))', "p50"), (f'histogram_quantile(0.99, sum by (le) (rate(daybook_append_commit_seconds_bucket{J}[$__rate_interval])))', "p99")], "s")
panel("Batch sizes", [(f'sum(rate(daybook_append_batch_size_sum{J}[$__rate_interval])) / sum(rate(daybook_append_batch_size_count{J}[$__rate_interval]))', "commands per batch (mean)"), (f'sum(rate(daybook_append_batch_events_sum{J}[$__rate_interval])) / sum(rate(daybook_append_batch_events_count{J}[$__rate_interval]))', "events per transaction (mean)"), (f'histogram_quantile(0.99, sum by (le) (rate(daybook_append_batch_size_bucket{J}[$__rate_interval])))', "commands per batch p99")])
panel("Replays, conflicts, refusals", [(f'sum(rate(daybook_idempotent_replays_total{J}[$__rate_interval]))', "idempotent replays"), (f'sum(rate(daybook_append_conflicts_total{J}[$__rate_interval]))', "conflicted batches"), (f'sum(rate(daybook_append_unavailable_total{J}[$__rate_interval]))', "refused: PostgreSQL unreachable")], "ops")
panel("Write leadership", [(f'daybook_command_leader{J}', "leader {{instance}}"), (f'sum(rate(daybook_append_fenced_total{J}[$__rate_interval]))', "fenced batches"), (f'sum(rate(daybook_append_not_leader_total{J}[$__rate_interval]))', "refused: not the leader")])
panel("Idempotency records", [(f'sum by (instance) (daybook_idempotency_records{J})', "{{instance}}")])
panel("Idempotency sweep", [(f'sum(rate(daybook_idempotency_swept_total{J}[$__rate_interval]))', "swept"), (f'sum(rate(daybook_idempotency_sweep_failures_total{J}[$__rate_interval]))', "failures")], "ops")

newrow("Projection (daybook-projector)")
panel("Position", [(f'max by (projection) (daybook_projection_position{J} * on (job, instance) group_left () (daybook_projector_leader == 1))', "{{projection}}")], "short")
panel("Lag (seconds)", [(f'max by (projection) (daybook_projection_lag_seconds{J} * on (job, instance) group_left () (daybook_projector_leader == 1))', "{{projection}}")], "s")
panel("Lag (events)", [(f'max by (projection) (daybook_projection_lag_events{J} * on (job, instance) group_left () (daybook_projector_leader == 1))', "{{projection}}")], "short")
panel("Events applied", [(f'sum(rate(daybook_projection_events_total{J}[$__rate_interval]))', "events/s")], "ops")
panel("Batch commit latency", [(f'histogram_quantile(0.5, sum by (le) (rate(daybook_projection_commit_seconds_bucket{J}[$__rate_interval])))', "p50"), (f'histogram_quantile(0.99, sum by (le) (rate(daybook_projection_commit_seconds_bucket{J}[$__rate_interval])))', "p99")], "s")
panel("Events per batch", [(f'sum(rate(daybook_projection_batch_events_sum{J}[$__rate_interval])) / sum(rate(daybook_projection_batch_events_count{J}[$__rate_interval]))', "mean"), (f'histogram_quantile(0.99, sum by (le) (rate(daybook_projection_batch_events_bucket{J}[$__rate_interval])))', "p99")])
panel("Redis resyncs by reason", [(f'sum by (reason) (increase(daybook_projection_redis_resyncs_total{J}[$__rate_interval]))', "{{reason}}")])
panel("Errors", [(f'sum(increase(daybook_projection_errors_total{J}[$__rate_interval]))', "SQL batches retried"), (f'sum(increase(daybook_projection_redis_failures_total{J}[$__rate_interval]))', "Redis steps abandoned")])
panel("Leader and epoch", [(f'daybook_projector_leader{J}', "leader {{instance}}"), (f'daybook_projector_epoch{J}', "epoch {{instance}}")])

newrow("Reads (daybook-query)")
panel("Reads by model", [(f'sum by (model) (rate(daybook_query_reads_total{J}[$__rate_interval]))', "{{model}}")], "reqps")
panel("Redis fallbacks by reason", [(f'sum by (reason) (rate(daybook_query_redis_fallbacks_total{J}[$__rate_interval]))', "{{reason}}")], "reqps")
panel("Waiting reads and probes", [(f'sum(daybook_query_waiting_reads{J})', "waiting reads"), (f'sum by (model) (rate(daybook_query_position_probes_total{J}[$__rate_interval]))', "probes/s {{model}}")])
panel("Event feed", [(f'sum(daybook_query_feed_streams{J})', "open streams"), (f'sum(rate(daybook_query_feed_pages_total{J}[$__rate_interval]))', "pages/s"), (f'sum(rate(daybook_query_feed_catchup_pages_total{J}[$__rate_interval]))', "stream catch-up pages/s"), (f'sum(rate(daybook_query_feed_slow_disconnects_total{J}[$__rate_interval]))', "slow consumers cut off/s")])

newrow("Processes")
panel("CPU", [(f'rate(process_cpu_seconds_total{J}[$__rate_interval])', "{{job}} {{instance}}")], "percentunit")
panel("Resident memory", [(f'process_resident_memory_bytes{J}', "{{job}} {{instance}}")], "bytes")
panel("Open file descriptors", [(f'process_open_fds{J} / process_max_fds{J}', "{{job}} {{instance}}")], "percentunit")
panel("Uptime", [(f'time() - process_start_time_seconds{J}', "{{job}} {{instance}}")], "s")
panel("Builds", [(f'daybook_build_info{J}', "")], w=16, kind="table")

dash = {
    "title": "Daybook",
    "uid": "daybook",
    "description": "Daybook's services: HTTP, writes, projection, reads, processes (docs/metrics.md).",
    "tags": ["daybook"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "timepicker": {},
    "timezone": "",
    "annotations": {"list": []},
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "job", "label": "Job", "type": "query", "datasource": DS,
         "query": {"query": "label_values(daybook_build_info, job)", "refId": "job"},
         "definition": "label_values(daybook_build_info, job)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0,
         "refresh": 2, "options": [], "sort": 1},
    ]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
