/* No fixed capacity turns valid input into a stuck component: random valid histories
 * with hundreds of currencies in one batch, huge transactions, a stream of thousands
 * of events and many accounts always project, and `daybook-admin verify` is clean. */
#include <criterion/criterion.h>
#include <event2/buffer.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(capacity, .init = setup, .fini = teardown, .timeout = 240);

/* --- a generator of valid histories ------------------------------------------------------ */

struct acct {
	char id[LEDGER_ID_MAX + 1];
	struct ledger_account st;
};

/* The accounts as the log has them, and the transaction being built: the columns of
 * one INSERT ... SELECT FROM unnest, which commits its events in one transaction as
 * the command service's batches do. */
struct history {
	unsigned seed;
	struct acct *accounts;
	size_t naccounts;
	long long transfers, requests;
	struct evbuffer *cols[5]; /* stream, version, type, data, metadata */
	size_t nevents, total;
	PGconn *pg;
};

static unsigned rnd(struct history *h, unsigned n)
{
	return (unsigned)rand_r(&h->seed) % n;
}

static void begin_tx(struct history *h)
{
	for (int i = 0; i < 5; i++) {
		h->cols[i] = evbuffer_new();
		cr_assert_not_null(h->cols[i]);
		evbuffer_add(h->cols[i], "{", 1);
	}
	h->nevents = 0;
}

static void commit_tx(struct history *h)
{
	char *params[5];
	PGresult *r;

	for (int i = 0; i < 5; i++) {
		evbuffer_add(h->cols[i], "}", 2); /* with the NUL */
		params[i] = (char *)evbuffer_pullup(h->cols[i], -1);
	}
	if (h->nevents) {
		r = PQexecParams(h->pg,
				 "INSERT INTO events (stream, version, type, data, metadata) "
				 "SELECT s, v, t, d, m FROM unnest($1::text[], $2::int[], $3::text[], "
				 "$4::jsonb[], $5::jsonb[]) WITH ORDINALITY AS x(s, v, t, d, m, i) "
				 "ORDER BY i",
				 5, NULL, (const char *const *)params, NULL, NULL, 0);
		cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "appending: %s",
			     PQresultErrorMessage(r));
		PQclear(r);
	}
	for (int i = 0; i < 5; i++)
		evbuffer_free(h->cols[i]);
	h->total += h->nevents;
}

/* One event of a decided command, in the shape the command service writes. */
static void emit(struct history *h, struct acct *a, const struct ledger_event *ev)
{
	char stream[LEDGER_ID_MAX + 16], version[16], meta[160];
	json_t *data = ledger_event_to_json(ev);
	char *text = data ? json_dumps(data, JSON_COMPACT) : NULL;

	cr_assert_not_null(text);
	cr_assert(ledger_evolve(&a->st, ev), "the generator decided an event that cannot apply");
	snprintf(stream, sizeof(stream), "account-%s", a->id);
	snprintf(version, sizeof(version), "%d", a->st.version);
	snprintf(meta, sizeof(meta),
		 "{\"request_id\":\"prop-%lld\",\"token_id\":\"test-write\",\"time\":"
		 "\"2026-01-01T00:00:00Z\"}",
		 h->requests);
	pg_array_append(h->cols[0], stream, h->nevents == 0);
	pg_array_append(h->cols[1], version, h->nevents == 0);
	pg_array_append(h->cols[2], ledger_event_name(ev->type), h->nevents == 0);
	pg_array_append(h->cols[3], text, h->nevents == 0);
	pg_array_append(h->cols[4], meta, h->nevents == 0);
	h->nevents++;
	free(text);
	json_decref(data);
}

static struct acct *open_account(struct history *h, const char *id, const char *currency)
{
	static const char *const names[] = { "Ann", "Zo\xc3\xab \"Q\" \\",
					     "caf\xc3\xa9 \xe2\x82\xac", "B" };
	struct acct *a = &h->accounts[h->naccounts++];
	struct ledger_event ev;

	snprintf(a->id, sizeof(a->id), "%s", id);
	memset(&a->st, 0, sizeof(a->st));
	h->requests++;
	cr_assert_eq(ledger_decide_open(&a->st, a->id, names[rnd(h, 4)], currency,
					rnd(h, 3) ? 0 : (int64_t)rnd(h, 100000), &ev),
		     LEDGER_OK);
	ev.account_id = a->id;
	emit(h, a, &ev);
	return a;
}

static const char *reference(struct history *h)
{
	static const char *const refs[] = { NULL, "rent", "q\"uote \\ caf\xc3\xa9", "" };
	return refs[rnd(h, 4)];
}

static int64_t amount(struct history *h)
{
	/* Mostly small; sometimes huge, so that sums pass int64 and overflow is refused. */
	return rnd(h, 10) ? 1 + rnd(h, 100000) : LEDGER_AMOUNT_MAX - rnd(h, 1000);
}

static void deposit(struct history *h, struct acct *a, int64_t amt)
{
	struct ledger_event ev;

	h->requests++;
	if (ledger_decide_deposit(&a->st, -1, amt, reference(h), &ev) == LEDGER_OK)
		emit(h, a, &ev);
}

static void withdraw(struct history *h, struct acct *a, int64_t amt)
{
	struct ledger_event ev;

	h->requests++;
	if (ledger_decide_withdraw(&a->st, -1, amt, reference(h), &ev) == LEDGER_OK)
		emit(h, a, &ev);
}

static void transfer(struct history *h, struct acct *from, struct acct *to, int64_t amt)
{
	struct ledger_event ev[2];
	char id[LEDGER_ID_MAX + 1];

	snprintf(id, sizeof(id), "t-%u-%lld", h->seed, h->transfers);
	h->requests++;
	if (ledger_decide_transfer(&from->st, &to->st, id, amt, reference(h), ev) != LEDGER_OK)
		return;
	h->transfers++;
	emit(h, from, &ev[0]);
	emit(h, to, &ev[1]);
}

/* Empty the account, then close it. */
static void close_account(struct history *h, struct acct *a)
{
	struct ledger_event ev;

	if (a->st.closed)
		return;
	if (a->st.balance > 0)
		withdraw(h, a, a->st.balance);
	else if (a->st.balance < 0)
		deposit(h, a, -a->st.balance);
	h->requests++;
	if (ledger_decide_close(&a->st, -1, &ev) == LEDGER_OK)
		emit(h, a, &ev);
}

/* A random account of the same currency as a (a itself when it is alone in it). */
static struct acct *partner(struct history *h, const struct acct *a)
{
	for (int tries = 0; tries < 50; tries++) {
		struct acct *b = &h->accounts[rnd(h, (unsigned)h->naccounts)];
		if (b != a && strcmp(b->st.currency, a->st.currency) == 0)
			return b;
	}
	/* The accounts of one currency were opened side by side. */
	if (a > h->accounts && strcmp(a[-1].st.currency, a->st.currency) == 0)
		return (struct acct *)&a[-1];
	return (struct acct *)&a[1];
}

/* A transaction of n random commands over the accounts there are. */
static void random_tx(struct history *h, unsigned n)
{
	begin_tx(h);
	for (unsigned i = 0; i < n; i++) {
		struct acct *a = &h->accounts[rnd(h, (unsigned)h->naccounts)];
		unsigned op = rnd(h, 100);
		if (op < 30)
			deposit(h, a, amount(h));
		else if (op < 50)
			withdraw(h, a, 1 + rnd(h, 50000));
		else if (op < 97)
			transfer(h, a, partner(h, a), 1 + rnd(h, 50000));
		else
			close_account(h, a);
	}
	commit_tx(h);
}

/* --- checks ----------------------------------------------------------------------------- */

/* daybook-admin <what> on the test database; its exit status, its output into out. */
static int admin(const char *what, char *out, size_t len)
{
	const char *args[] = { what, what[0] == 'r' ? "all" : NULL, NULL };
	char *text;
	int status = harness_admin(stack.db, stack.redis_url, args, &text);

	snprintf(out, len, "%s", text);
	free(text);
	return status;
}

/* GET /totals from the query service lists every currency of rm_totals; the body
 * (caller frees) is returned for comparison. */
static char *assert_totals_served(const struct service *query)
{
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct response r = http_request(query->port, "GET", "/totals", h, NULL, 10);
	long long want = sql_int(stack.db, "SELECT count(*) FROM rm_totals");
	char *body;

	cr_assert_eq(r.status, 200, "GET /totals: %d %s", r.status, r.body ? r.body : "");
	cr_assert_not_null(r.json, "GET /totals is not JSON (integers past int64 are fine)");
	cr_assert_eq((long long)json_array_size(json_object_get(r.json, "currencies")), want);
	body = strdup(r.body);
	response_free(&r);
	return body;
}

/* The same body from Redis and from the SQL path (a query service without Redis). */
static void assert_totals_agree(const struct service *query)
{
	struct service sql_only;
	char *from_redis = assert_totals_served(query), *from_sql;

	harness_start_query(&sql_only, stack.db, "redis://127.0.0.1:1");
	from_sql = assert_totals_served(&sql_only);
	harness_stop(&sql_only);
	cr_assert_str_eq(from_redis, from_sql, "GET /totals differs between Redis and SQL");
	free(from_redis);
	free(from_sql);
}

Test(capacity, random_valid_histories_always_project_and_verify_clean)
{
	const char *env = getenv("DAYBOOK_TEST_SEED");
	struct history h = { .seed = env && *env ? (unsigned)strtoul(env, NULL, 10)
						 : (unsigned)time(NULL) ^ (unsigned)getpid() };
	unsigned seed = h.seed;
	char conninfo[512], cur[4], id[LEDGER_ID_MAX + 1], *out = malloc(1 << 16);
	struct service projector, query;
	struct acct *longest;
	unsigned codes[26 * 26 * 26];
	int status;

	fprintf(stderr, "capacity: seed %u (DAYBOOK_TEST_SEED=%u repeats this run)\n", seed, seed);
	cr_log_info("seed %u", seed);
	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	h.pg = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(h.pg), CONNECTION_OK, "%s", PQerrorMessage(h.pg));
	h.accounts = calloc(4000, sizeof(*h.accounts));
	cr_assert(h.accounts && out);

	/* 300 currencies, two accounts each, in one transaction: more currencies in one
	 * projector batch than any fixed table would hold. */
	for (unsigned i = 0; i < 26 * 26 * 26; i++)
		codes[i] = i;
	for (unsigned i = 0; i < 300; i++) { /* the first 300 of a random permutation */
		unsigned j = i + rnd(&h, 26 * 26 * 26 - i), t = codes[i];
		codes[i] = codes[j];
		codes[j] = t;
	}
	begin_tx(&h);
	for (unsigned i = 0; i < 300; i++) {
		snprintf(cur, sizeof(cur), "%c%c%c", 'A' + codes[i] / 676, 'A' + codes[i] / 26 % 26,
			 'A' + codes[i] % 26);
		for (int k = 0; k < 2; k++) {
			snprintf(id, sizeof(id), "c-%s-%d", cur, k);
			deposit(&h, open_account(&h, id, cur), amount(&h));
		}
	}
	commit_tx(&h);
	/* Many accounts of one currency, in a huge transaction. */
	begin_tx(&h);
	for (int i = 0; i < 1500; i++) {
		snprintf(id, sizeof(id), "m-%d", i);
		deposit(&h, open_account(&h, id, "EUR"), 1 + rnd(&h, 1000000));
	}
	commit_tx(&h);
	/* One stream of thousands of events, most of them in one transaction. */
	begin_tx(&h);
	longest = open_account(&h, "long-stream", "EUR");
	for (int i = 0; i < 5000; i++) {
		if (rnd(&h, 3))
			deposit(&h, longest, 1 + rnd(&h, 1000));
		else
			withdraw(&h, longest, 1 + rnd(&h, 1000));
	}
	commit_tx(&h);
	for (int i = 0; i < 10; i++)
		random_tx(&h, 1 + rnd(&h, 600));

	harness_start_projector(&projector, stack.db, stack.redis_url);
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	/* More while the projector follows live. */
	for (int i = 0; i < 30; i++) {
		random_tx(&h, 1 + rnd(&h, 300));
		if (rnd(&h, 4) == 0) {
			begin_tx(&h);
			for (int k = 0; k < 500; k++)
				deposit(&h, longest, 1 + rnd(&h, 1000));
			commit_tx(&h);
		}
	}
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	fprintf(stderr,
		"capacity: seed %u, %zu events, %zu accounts, %lld transfers, stream of %d\n", seed,
		h.total, h.naccounts, h.transfers, longest->st.version);
	harness_assert_models_match_log(stack.db);
	harness_assert_redis_matches_sql(stack.db, stack.redis_url);
	status = admin("verify", out, 1 << 16);
	cr_assert_eq(status, 0, "seed %u: verify exited %d\n%s", seed, status, out);
	harness_start_query(&query, stack.db, stack.redis_url);
	assert_totals_agree(&query);
	/* A rebuild of both models folds the same history into shadows, and verifies. */
	status = admin("rebuild", out, 1 << 16);
	cr_assert_eq(status, 0, "seed %u: rebuild exited %d\n%s", seed, status, out);
	harness_wait_caught_up(stack.db, stack.redis_url, 60);
	status = admin("verify", out, 1 << 16);
	cr_assert_eq(status, 0, "seed %u: verify after the rebuild exited %d\n%s", seed, status,
		     out);
	assert_totals_agree(&query);
	harness_stop(&query);
	cr_assert_eq(harness_stop(&projector), 0);
	PQfinish(h.pg);
	free(h.accounts);
	free(out);
}
