/* A small Prometheus metrics registry: counters, gauges and histograms with labels.
 * Thread-safe: the worker threads of one process may share a registry. */
#ifndef DAYBOOK_METRICS_H
#define DAYBOOK_METRICS_H

#include <stddef.h>

struct evbuffer;
struct metrics;
struct metric;

enum metric_type { METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM };

/* Bucket bounds for the common histograms. */
extern const double metrics_latency_buckets[]; /* seconds, 50 µs .. 5 s */
extern const size_t metrics_latency_buckets_len;
extern const double metrics_size_buckets[]; /* 1 .. 1024, powers of two */
extern const size_t metrics_size_buckets_len;

int metrics_open(struct metrics **out) __attribute__((warn_unused_result));
void metrics_close(struct metrics **m);

/* The series `name{labels}`, created on first use. A lookup is one hash probe under a
 * read lock, but still a string build and hash: take handles once (at start) where the
 * labels are known, and keep them. `labels` is the inside of the braces
 * (`route="/x",status="200"`) or "" for none; it is copied. `help` and `buckets` must be
 * static. For histograms the bounds are ascending, +Inf is implicit. The series lives as
 * long as the registry; NULL only when out of memory (the metric calls accept NULL). */
struct metric *metrics_get(struct metrics *m, enum metric_type type, const char *name,
			   const char *help, const char *labels, const double *buckets,
			   size_t nbuckets);

void metric_add(struct metric *s, double v);     /* counters and gauges */
void metric_set(struct metric *s, double v);     /* gauges */
void metric_observe(struct metric *s, double v); /* histograms */

/* The whole registry in Prometheus text exposition format 0.0.4. */
void metrics_render(struct metrics *m, struct evbuffer *out);

/* daybook_build_info{version,commit} and process_* (CPU, memory, file descriptors,
 * start time), read from /proc/self now (shared/metrics_process.c); /metrics renders
 * them after the registry. */
void metrics_render_process(struct evbuffer *out);

#endif
