/* A small Prometheus metrics registry: counters, gauges and histograms with labels. */
#include "metrics.h"

#include <errno.h>
#include <event2/buffer.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "strmap.h"

const double metrics_latency_buckets[] = { 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
					   0.005,   0.01,   0.025,   0.05,   0.1,   0.25,
					   0.5,     1,      2.5,     5 };
const size_t metrics_latency_buckets_len = sizeof(metrics_latency_buckets) /
					   sizeof(metrics_latency_buckets[0]);
const double metrics_size_buckets[] = { 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024 };
const size_t metrics_size_buckets_len = sizeof(metrics_size_buckets) /
					sizeof(metrics_size_buckets[0]);

struct metric {
	struct metric *next;
	struct metrics *owner;
	const char *name, *help;
	char *labels;
	enum metric_type type;
	double value; /* counter, gauge; histogram: sum */
	unsigned long long count;
	const double *bounds;
	size_t nbounds;
	unsigned long long *buckets; /* non-cumulative counts, nbounds + 1 */
	bool index_missed;           /* not in the index (out of memory when created) */
};

struct metrics {
	struct metric *head, *tail; /* creation order keeps families together when rendered */
	pthread_mutex_t lock;       /* the list and the values: workers share the registry */
	/* "name\x1flabels" -> series, so that a lookup is one hash probe under a read lock
	 * (shared by every worker), not a locked walk of every series. */
	struct strmap *index;
	pthread_rwlock_t index_lock;
};

int metrics_open(struct metrics **out)
{
	int rc;

	*out = calloc(1, sizeof(**out));
	if (!*out)
		return -ENOMEM;
	rc = strmap_open(&(*out)->index, NULL);
	if (rc) {
		free(*out);
		*out = NULL;
		return rc;
	}
	pthread_mutex_init(&(*out)->lock, NULL);
	pthread_rwlock_init(&(*out)->index_lock, NULL);
	return 0;
}

void metrics_close(struct metrics **m)
{
	if (!*m)
		return;
	for (struct metric *s = (*m)->head, *next; s; s = next) {
		next = s->next;
		free(s->labels);
		free(s->buckets);
		free(s);
	}
	strmap_close(&(*m)->index);
	pthread_rwlock_destroy(&(*m)->index_lock);
	pthread_mutex_destroy(&(*m)->lock);
	free(*m);
	*m = NULL;
}

/* A new series in the list (m->lock held). */
static struct metric *create_locked(struct metrics *m, enum metric_type type, const char *name,
				    const char *help, const char *labels, const double *buckets,
				    size_t nbuckets)
{
	struct metric *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->owner = m;
	s->name = name;
	s->help = help;
	s->type = type;
	s->labels = strdup(labels);
	if (type == METRIC_HISTOGRAM) {
		s->bounds = buckets;
		s->nbounds = nbuckets;
		s->buckets = calloc(nbuckets + 1, sizeof(*s->buckets));
	}
	if (!s->labels || (type == METRIC_HISTOGRAM && !s->buckets)) {
		free(s->labels);
		free(s->buckets);
		free(s);
		return NULL;
	}
	/* Insert after the last series of the same family, so families stay contiguous. */
	struct metric *after = NULL;
	for (struct metric *p = m->head; p; p = p->next)
		if (strcmp(p->name, name) == 0)
			after = p;
	if (after) {
		s->next = after->next;
		after->next = s;
		if (m->tail == after)
			m->tail = s;
	} else if (m->tail) {
		m->tail->next = s;
		m->tail = s;
	} else {
		m->head = m->tail = s;
	}
	return s;
}

struct metric *metrics_get(struct metrics *m, enum metric_type type, const char *name,
			   const char *help, const char *labels, const double *buckets,
			   size_t nbuckets)
{
	char small[256], *key = small;
	size_t nlen = strlen(name), llen = strlen(labels);
	struct metric *s;

	if (nlen + llen + 2 > sizeof(small) && !(key = malloc(nlen + llen + 2)))
		return NULL;
	memcpy(key, name, nlen);
	key[nlen] = '\x1f';
	memcpy(key + nlen + 1, labels, llen + 1);
	pthread_rwlock_rdlock(&m->index_lock);
	s = strmap_get(m->index, key);
	pthread_rwlock_unlock(&m->index_lock);
	if (s)
		goto done;
	pthread_rwlock_wrlock(&m->index_lock);
	s = strmap_get(m->index, key); /* another worker may have created it meanwhile */
	if (!s) {
		pthread_mutex_lock(&m->lock);
		s = create_locked(m, type, name, help, labels, buckets, nbuckets);
		pthread_mutex_unlock(&m->lock);
		/* Out of memory for the index: this caller still gets the series; a later
		 * lookup would add a twin (only ever under memory exhaustion). */
		if (s && !strmap_put(m->index, key, s))
			s->index_missed = true;
	}
	pthread_rwlock_unlock(&m->index_lock);
done:
	if (key != small)
		free(key);
	return s;
}

void metric_add(struct metric *s, double v)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->owner->lock);
	s->value += v;
	pthread_mutex_unlock(&s->owner->lock);
}

void metric_set(struct metric *s, double v)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->owner->lock);
	s->value = v;
	pthread_mutex_unlock(&s->owner->lock);
}

void metric_observe(struct metric *s, double v)
{
	size_t i;

	if (!s)
		return;
	for (i = 0; i < s->nbounds && v > s->bounds[i]; i++)
		;
	pthread_mutex_lock(&s->owner->lock);
	s->buckets[i]++;
	s->count++;
	s->value += v;
	pthread_mutex_unlock(&s->owner->lock);
}

static const char *type_name(enum metric_type t)
{
	return t == METRIC_COUNTER ? "counter" : t == METRIC_GAUGE ? "gauge" : "histogram";
}

static void render_histogram(const struct metric *s, struct evbuffer *out)
{
	const char *sep = s->labels[0] ? "," : "";
	unsigned long long cum = 0;

	for (size_t i = 0; i <= s->nbounds; i++) {
		cum += s->buckets[i];
		if (i < s->nbounds)
			evbuffer_add_printf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", s->name,
					    s->labels, sep, s->bounds[i], cum);
		else
			evbuffer_add_printf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", s->name,
					    s->labels, sep, cum);
	}
	if (s->labels[0])
		evbuffer_add_printf(out, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", s->name, s->labels,
				    s->value, s->name, s->labels, s->count);
	else
		evbuffer_add_printf(out, "%s_sum %.9g\n%s_count %llu\n", s->name, s->value, s->name,
				    s->count);
}

void metrics_render(struct metrics *m, struct evbuffer *out)
{
	const char *family = NULL;

	pthread_mutex_lock(&m->lock);
	for (const struct metric *s = m->head; s; s = s->next) {
		if (!family || strcmp(family, s->name) != 0) {
			family = s->name;
			evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", s->name, s->help,
					    s->name, type_name(s->type));
		}
		if (s->type == METRIC_HISTOGRAM)
			render_histogram(s, out);
		else if (s->labels[0])
			evbuffer_add_printf(out, "%s{%s} %.17g\n", s->name, s->labels, s->value);
		else
			evbuffer_add_printf(out, "%s %.17g\n", s->name, s->value);
	}
	pthread_mutex_unlock(&m->lock);
}
