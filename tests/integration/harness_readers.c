/* Integration-test harness: reader threads that sample GET /accounts/{id} under load,
 * and the check that every sample is true to the log. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SAMPLES 5000

struct readers {
	const struct service *query;
	const char *const *accounts;
	size_t naccounts;
	int threads;
	pthread_t tid[8];
	atomic_bool stop;
	atomic_int reads, errors;
	pthread_mutex_t lock;
	struct read_sample *samples;
	size_t n;
};

static void *read_loop(void *arg)
{
	struct readers *r = arg;
	unsigned seed = (unsigned)(uintptr_t)pthread_self();
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	char path[128];

	while (!atomic_load(&r->stop)) {
		const char *id = r->accounts[(size_t)rand_r(&seed) % r->naccounts];
		snprintf(path, sizeof(path), "/accounts/%s", id);
		struct response resp = http_request(r->query->port, "GET", path, h, NULL, 10);
		atomic_fetch_add(&r->reads, 1);
		if (resp.status != 200 || !resp.json) {
			atomic_fetch_add(&r->errors, 1);
		} else {
			pthread_mutex_lock(&r->lock);
			if (r->n < MAX_SAMPLES) {
				struct read_sample *s = &r->samples[r->n++];
				snprintf(s->account, sizeof(s->account), "%s", id);
				s->version = (int)json_integer_value(
					json_object_get(resp.json, "version"));
				s->balance = json_integer_value(
					json_object_get(resp.json, "balance"));
			}
			pthread_mutex_unlock(&r->lock);
		}
		response_free(&resp);
	}
	return NULL;
}

struct readers *harness_readers_start(const struct service *query, const char *const *accounts,
				      size_t naccounts, int threads)
{
	struct readers *r = calloc(1, sizeof(*r));

	cr_assert(r && threads <= 8);
	r->query = query;
	r->accounts = accounts;
	r->naccounts = naccounts;
	r->threads = threads;
	r->samples = calloc(MAX_SAMPLES, sizeof(*r->samples));
	cr_assert(r->samples);
	pthread_mutex_init(&r->lock, NULL);
	for (int i = 0; i < threads; i++)
		pthread_create(&r->tid[i], NULL, read_loop, r);
	return r;
}

void harness_readers_stop(struct readers *r, int *reads, int *errors, struct read_sample **samples,
			  size_t *nsamples)
{
	atomic_store(&r->stop, true);
	for (int i = 0; i < r->threads; i++)
		pthread_join(r->tid[i], NULL);
	*reads = atomic_load(&r->reads);
	*errors = atomic_load(&r->errors);
	*samples = r->samples;
	*nsamples = r->n;
	pthread_mutex_destroy(&r->lock);
	free(r);
}

void harness_assert_samples_true(const char *db, const struct read_sample *s, size_t n)
{
	char q[8192];
	size_t len =
		(size_t)snprintf(q, sizeof(q),
				 "SELECT substr(stream, 9), version, sum(CASE type "
				 "WHEN 'FundsDeposited' THEN (data->>'amount')::bigint "
				 "WHEN 'TransferReceived' THEN (data->>'amount')::bigint "
				 "WHEN 'FundsWithdrawn' THEN -(data->>'amount')::bigint "
				 "WHEN 'TransferSent' THEN -(data->>'amount')::bigint ELSE 0 END) "
				 "OVER (PARTITION BY stream ORDER BY version) FROM events "
				 "WHERE stream IN ('-'");
	PGresult *r;

	/* Only the sampled accounts (ids are of a quote-free alphabet). */
	for (size_t i = 0; i < n && len < sizeof(q) - 100; i++) {
		bool seen = false;
		for (size_t j = 0; j < i && !seen; j++)
			seen = strcmp(s[j].account, s[i].account) == 0;
		if (!seen)
			len += (size_t)snprintf(q + len, sizeof(q) - len, ",'account-%s'",
						s[i].account);
	}
	snprintf(q + len, sizeof(q) - len, ")");
	r = sql(db, q);

	for (size_t i = 0; i < n; i++) {
		bool found = false;
		for (int row = 0; row < PQntuples(r) && !found; row++) {
			if (atoi(PQgetvalue(r, row, 1)) != s[i].version ||
			    strcmp(PQgetvalue(r, row, 0), s[i].account) != 0)
				continue;
			found = true;
			cr_assert_eq(atoll(PQgetvalue(r, row, 2)), s[i].balance,
				     "%s at version %d was shown with balance %lld", s[i].account,
				     s[i].version, s[i].balance);
		}
		cr_assert(found, "%s version %d is not in the log", s[i].account, s[i].version);
	}
	PQclear(r);
}
