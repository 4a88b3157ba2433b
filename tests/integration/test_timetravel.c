/* Time travel (SPEC §4.2): accounts and statements as of a position token or at a
 * time, compared with a fold of the event log computed here, independently, from the
 * events table. The history is random (seeded; the seed is printed). */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static struct stack stack;

static void setup(void)
{
	harness_stack_redis(&stack);
	harness_start_command(&stack.command, stack.db);
	harness_start_query(&stack.query, stack.db, stack.redis_url);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(timetravel, .init = setup, .fini = teardown, .timeout = 240);

/* The readable horizon is the cluster's: a transaction held open by a test running
 * beside these holds it back for a while. Reads that should answer may wait. */
#define WAIT "wait_ms=10000"

static struct response get(const char *path)
{
	const char *h[] = { "Authorization: Bearer " TOKEN_READ, NULL };

	return http_request(stack.query.port, "GET", path, h, NULL, 30);
}

/* POST and return its status; the position token of a 201 goes into pos (if given). */
static int write_(const char *path, const char *body, char *pos, size_t len)
{
	struct response r = post(&stack.command, path, body, NULL);
	int status = r.status;

	if (pos && status == 201)
		snprintf(pos, len, "%s", json_string_value(json_object_get(r.json, "position")));
	response_free(&r);
	return status;
}

static void open_account(const char *id, long long overdraft)
{
	char body[256];

	snprintf(body, sizeof(body),
		 "{\"id\":\"%s\",\"name\":\"Name of %s\",\"currency\":\"EUR\","
		 "\"overdraft_limit\":%lld}",
		 id, id, overdraft);
	cr_assert_eq(write_("/accounts", body, NULL, 0), 201, "opening %s", id);
}

static int money(const char *id, const char *kind, long long amount)
{
	char path[128], body[128];

	snprintf(path, sizeof(path), "/accounts/%s/%s", id, kind);
	snprintf(body, sizeof(body), "{\"amount\":%lld,\"reference\":\"r%lld\"}", amount, amount);
	return write_(path, body, NULL, 0);
}

/* --- the independent fold -------------------------------------------------------- */

struct ev {
	char stream[80];
	int version;
	unsigned long long txid, position;
	long long at_us; /* recorded_at, microseconds since the epoch */
	char at[32];     /* recorded_at as the API writes it */
	char before[32]; /* recorded_at minus one microsecond, as RFC 3339 */
	char type[24];
	long long amount;
	char counterparty[80];
};

struct log {
	struct ev *e;
	int n;
};

static void load_log(struct log *lg)
{
	PGresult *r = sql(
		stack.db,
		"SELECT stream, version, txid::text, position, "
		"(extract(epoch FROM recorded_at) * 1000000)::bigint, "
		"to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
		"to_char((recorded_at - interval '1 microsecond') AT TIME ZONE 'UTC', "
		"'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), type, coalesce((data->>'amount')::bigint, 0), "
		"coalesce(data->>'to', data->>'from', '') FROM events e ORDER BY e.txid, e.position"); /* the xid8, not its text */

	lg->n = PQntuples(r);
	lg->e = calloc((size_t)lg->n + 1, sizeof(*lg->e));
	for (int i = 0; i < lg->n; i++) {
		struct ev *e = &lg->e[i];
		snprintf(e->stream, sizeof(e->stream), "%s", PQgetvalue(r, i, 0));
		e->version = atoi(PQgetvalue(r, i, 1));
		e->txid = strtoull(PQgetvalue(r, i, 2), NULL, 10);
		e->position = strtoull(PQgetvalue(r, i, 3), NULL, 10);
		e->at_us = strtoll(PQgetvalue(r, i, 4), NULL, 10);
		snprintf(e->at, sizeof(e->at), "%s", PQgetvalue(r, i, 5));
		snprintf(e->before, sizeof(e->before), "%s", PQgetvalue(r, i, 6));
		snprintf(e->type, sizeof(e->type), "%s", PQgetvalue(r, i, 7));
		e->amount = strtoll(PQgetvalue(r, i, 8), NULL, 10);
		snprintf(e->counterparty, sizeof(e->counterparty), "%s", PQgetvalue(r, i, 9));
	}
	PQclear(r);
}

/* A point: a token (txid, position), or a time in microseconds. */
struct point {
	bool is_time;
	unsigned long long txid, position;
	long long at_us;
};

static bool included(const struct ev *e, const struct point *p)
{
	if (p->is_time)
		return e->at_us <= p->at_us;
	return e->txid < p->txid || (e->txid == p->txid && e->position <= p->position);
}

struct item {
	int version;
	const char *type;
	long long amount, balance_after;
	const char *counterparty;
	const char *at;
};

struct state {
	int version;
	long long balance;
	bool closed;
	const char *opened_at, *updated_at;
	struct item *items; /* oldest first */
	int nitems;
};

static void fold(const struct log *lg, const char *id, const struct point *p, struct state *s)
{
	char stream[80];

	snprintf(stream, sizeof(stream), "account-%s", id);
	memset(s, 0, sizeof(*s));
	s->items = calloc((size_t)lg->n + 1, sizeof(*s->items));
	for (int i = 0; i < lg->n; i++) {
		const struct ev *e = &lg->e[i];
		const char *type = NULL;
		long long sign = 0;
		if (strcmp(e->stream, stream) != 0 || !included(e, p))
			continue;
		cr_assert_eq(e->version, s->version + 1,
			     "the log's order within %s: version %d (%llu.%llu) after %d", stream,
			     e->version, e->txid, e->position, s->version);
		s->version = e->version;
		s->updated_at = e->at;
		if (strcmp(e->type, "AccountOpened") == 0)
			s->opened_at = e->at;
		else if (strcmp(e->type, "AccountClosed") == 0)
			s->closed = true;
		else if (strcmp(e->type, "FundsDeposited") == 0)
			type = "deposit", sign = 1;
		else if (strcmp(e->type, "FundsWithdrawn") == 0)
			type = "withdrawal", sign = -1;
		else if (strcmp(e->type, "TransferReceived") == 0)
			type = "transfer_in", sign = 1;
		else if (strcmp(e->type, "TransferSent") == 0)
			type = "transfer_out", sign = -1;
		s->balance += sign * e->amount;
		if (type)
			s->items[s->nitems++] =
				(struct item){ e->version,
					       type,
					       e->amount,
					       s->balance,
					       e->counterparty[0] ? e->counterparty : NULL,
					       e->at };
	}
}

static long long jint(json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

static const char *jstr(json_t *o, const char *k)
{
	const char *v = json_string_value(json_object_get(o, k));
	return v ? v : "";
}

/* The query string of a point: as_of=<token> or at=<time>. */
static void point_query(const struct point *p, const char *time_text, char *out, size_t len)
{
	if (p->is_time)
		snprintf(out, len, "at=%s&" WAIT, time_text);
	else
		snprintf(out, len, "as_of=%llu.%llu&" WAIT, p->txid, p->position);
}

static void check_account(const struct log *lg, const char *id, const struct point *p,
			  const char *time_text)
{
	char q[128], path[256];
	struct state s;
	struct response r;

	fold(lg, id, p, &s);
	point_query(p, time_text, q, sizeof(q));
	snprintf(path, sizeof(path), "/accounts/%s?%s", id, q);
	r = get(path);
	if (s.version == 0) {
		cr_assert_eq(r.status, 404, "%s: %d %s", path, r.status, r.body);
		cr_assert_str_eq(jstr(r.json, "code"), "account_not_found");
	} else {
		char name[128];
		snprintf(name, sizeof(name), "Name of %s", id);
		cr_assert_eq(r.status, 200, "%s: %d %s", path, r.status, r.body);
		cr_assert_str_eq(jstr(r.json, "account_id"), id);
		cr_assert_str_eq(jstr(r.json, "name"), name);
		cr_assert_str_eq(jstr(r.json, "currency"), "EUR");
		cr_assert_eq(jint(r.json, "version"), s.version, "%s: %s", path, r.body);
		cr_assert_eq(jint(r.json, "balance"), s.balance, "%s: %s", path, r.body);
		cr_assert_str_eq(jstr(r.json, "status"), s.closed ? "closed" : "open", "%s", path);
		cr_assert_str_eq(jstr(r.json, "opened_at"), s.opened_at, "%s", path);
		cr_assert_str_eq(jstr(r.json, "updated_at"), s.updated_at, "%s: %s", path, r.body);
		cr_assert_eq(json_object_size(r.json), 9, "%s", r.body);
	}
	response_free(&r);
	free(s.items);
}

/* Page through the statement at a point with `limit`, comparing every item. */
static void check_statement(const struct log *lg, const char *id, const struct point *p,
			    const char *time_text, int limit)
{
	char q[128], path[256];
	struct state s;
	int next = 0, want = 0, pages = 0;

	fold(lg, id, p, &s);
	point_query(p, time_text, q, sizeof(q));
	want = s.nitems - 1;
	do {
		struct response r;
		json_t *items;
		if (next)
			snprintf(path, sizeof(path),
				 "/accounts/%s/transactions?%s&limit=%d&before=%d", id, q, limit,
				 next);
		else
			snprintf(path, sizeof(path), "/accounts/%s/transactions?%s&limit=%d", id, q,
				 limit);
		r = get(path);
		if (s.version == 0) {
			cr_assert_eq(r.status, 404, "%s: %d %s", path, r.status, r.body);
			response_free(&r);
			break;
		}
		cr_assert_eq(r.status, 200, "%s: %d %s", path, r.status, r.body);
		items = json_object_get(r.json, "items");
		for (size_t i = 0; i < json_array_size(items); i++, want--) {
			json_t *it = json_array_get(items, i);
			cr_assert_geq(want, 0, "%s: more items than the log has: %s", path, r.body);
			cr_assert_eq(jint(it, "version"), s.items[want].version, "%s: %s", path,
				     r.body);
			cr_assert_str_eq(jstr(it, "type"), s.items[want].type, "%s", path);
			cr_assert_eq(jint(it, "amount"), s.items[want].amount, "%s", path);
			cr_assert_eq(jint(it, "balance_after"), s.items[want].balance_after,
				     "%s: %s", path, r.body);
			cr_assert_str_eq(jstr(it, "at"), s.items[want].at, "%s", path);
			if (s.items[want].counterparty)
				cr_assert_str_eq(jstr(it, "counterparty"),
						 s.items[want].counterparty);
		}
		next = (int)jint(r.json, "next_before");
		cr_assert(json_array_size(items) == (size_t)limit || next == 0, "%s: %s", path,
			  r.body);
		response_free(&r);
		pages++;
	} while (next);
	cr_assert_eq(want, -1, "the statement at %s of %s lacks %d items", q, id, want + 1);
	free(s.items);
}

/* --- tests ----------------------------------------------------------------------- */

#define NACCOUNTS 4

Test(timetravel, as_of_and_at_equal_a_fold_of_the_log_at_random_points_of_a_random_history)
{
	const char *ids[NACCOUNTS] = { "tt-a", "tt-b", "tt-c", "tt-d" };
	unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
	struct log lg;
	char body[256];
	int xfer = 0;

	fprintf(stderr, "time travel history seed: %u\n", seed);
	srand(seed);
	/* Accounts open at different moments of the history, so early points miss some. */
	open_account(ids[0], 500);
	for (int i = 0; i < 240; i++) {
		int opened = 1 + (i >= 30) + (i >= 90) + (i >= 150);
		const char *a = ids[rand() % opened], *b = ids[rand() % opened];
		if (i == 30 || i == 90 || i == 150)
			open_account(ids[opened - 1], i == 90 ? 0 : 300);
		switch (rand() % 4) {
		case 0:
			(void)money(a, "deposits", 1 + rand() % 1000);
			break;
		case 1:
			(void)money(a, "withdrawals",
				    1 + rand() % 700); /* 422s too: nothing written */
			break;
		default:
			snprintf(body, sizeof(body),
				 "{\"id\":\"x%d\",\"from\":\"%s\",\"to\":\"%s\","
				 "\"amount\":%d}",
				 xfer++, a, b, 1 + rand() % 600);
			(void)write_("/transfers", body, NULL, 0);
			break;
		}
		if (i == 200) { /* tt-c: emptied and closed, later transfers to it are refused */
			PGresult *r = sql(
				stack.db,
				"SELECT balance FROM (SELECT sum(CASE WHEN type IN "
				"('FundsDeposited','TransferReceived') THEN (data->>'amount')::bigint "
				"WHEN type IN ('FundsWithdrawn','TransferSent') THEN -(data->>'amount')::bigint "
				"ELSE 0 END) AS balance FROM events WHERE stream = 'account-tt-c') s");
			long long bal = atoll(PQgetvalue(r, 0, 0));
			PQclear(r);
			if (bal > 0)
				cr_assert_eq(money("tt-c", "withdrawals", bal), 201);
			else if (bal < 0)
				cr_assert_eq(money("tt-c", "deposits", -bal), 201);
			cr_assert_eq(write_("/accounts/tt-c/close", "", NULL, 0), 201);
		}
	}
	load_log(&lg);
	cr_assert_gt(lg.n, 150);
	/* Random points: each event's own token and time (inclusive), the token just
	 * before it and the time one microsecond before it (exclusive). */
	for (int k = 0; k < 40; k++) {
		const struct ev *e = &lg.e[rand() % lg.n];
		struct point tok = { false, e->txid, e->position, 0 };
		struct point tok_before = { false, e->txid, e->position - 1, 0 };
		struct point at = { true, 0, 0, e->at_us };
		struct point at_before = { true, 0, 0, e->at_us - 1 };
		for (int a = 0; a < NACCOUNTS; a++) {
			check_account(&lg, ids[a], &tok, NULL);
			check_account(&lg, ids[a], &tok_before, NULL);
			check_account(&lg, ids[a], &at, e->at);
			check_account(&lg, ids[a], &at_before, e->before);
		}
		if (k % 8 == 0) {
			int a = rand() % NACCOUNTS;
			check_statement(&lg, ids[a], &at, e->at, 1 + rand() % 9);
			check_statement(&lg, ids[a], &tok, NULL, 1 + rand() % 9);
		}
	}
	/* The last point: the whole history, the closed account included. */
	{
		const struct ev *e = &lg.e[lg.n - 1];
		struct point at = { true, 0, 0, e->at_us };
		for (int a = 0; a < NACCOUNTS; a++) {
			check_account(&lg, ids[a], &at, e->at);
			check_statement(&lg, ids[a], &at, e->at, 50);
		}
	}
	free(lg.e);
}

Test(timetravel, an_account_that_did_not_exist_yet_is_not_found)
{
	char before[64], path[256];
	struct response r;
	PGresult *t;

	open_account("early", 0);
	cr_assert_eq(write_("/accounts/early/deposits", "{\"amount\":5}", before, sizeof(before)),
		     201);
	open_account("late", 0);
	t = sql(stack.db,
		"SELECT to_char((recorded_at - interval '1 microsecond') AT TIME ZONE 'UTC', "
		"'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM events WHERE stream = 'account-late'");
	const char *paths[] = { "/accounts/late?as_of=%s&" WAIT,
				"/accounts/late/transactions?as_of=%s&" WAIT,
				"/accounts/late?at=%s&" WAIT,
				"/accounts/late/transactions?at=%s&" WAIT,
				"/accounts/nobody?as_of=%s&" WAIT };
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		snprintf(path, sizeof(path), paths[i],
			 strstr(paths[i], "at=") && !strstr(paths[i], "as_of") ? PQgetvalue(t, 0, 0)
									       : before);
		r = get(path);
		cr_assert_eq(r.status, 404, "%s: %d %s", path, r.status, r.body);
		cr_assert_str_eq(jstr(r.json, "code"), "account_not_found", "%s", path);
		response_free(&r);
	}
	PQclear(t);
	/* And the one that did exist is there as it was. */
	snprintf(path, sizeof(path), "/accounts/early?as_of=%s&" WAIT, before);
	r = get(path);
	cr_assert_eq(r.status, 200, "%s: %d %s", path, r.status, r.body);
	cr_assert_eq(jint(r.json, "balance"), 5);
	response_free(&r);
}

struct held {
	PGconn *pg;
};

/* A transaction that holds the readable horizon back: it has appended an event and
 * not committed. */
static void hold(struct held *h)
{
	char conninfo[512];
	PGresult *r;

	harness_conninfo(stack.db, NULL, conninfo, sizeof(conninfo));
	h->pg = PQconnectdb(conninfo);
	cr_assert_eq(PQstatus(h->pg), CONNECTION_OK, "%s", PQerrorMessage(h->pg));
	r = PQexec(h->pg,
		   "BEGIN; INSERT INTO events (stream, version, type, data, metadata) VALUES "
		   "('account-held', 1, 'AccountOpened', '{\"account_id\":\"held\",\"name\":\"H\","
		   "\"currency\":\"EUR\",\"overdraft_limit\":0}', '{}')");
	cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(h->pg));
	PQclear(r);
}

static void release(struct held *h)
{
	PGresult *r = PQexec(h->pg, "COMMIT");

	cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(h->pg));
	PQclear(r);
	PQfinish(h->pg);
}

struct pending {
	char path[256];
	struct response r;
};

static void *get_in_thread(void *arg)
{
	struct pending *p = arg;

	p->r = get(p->path);
	return NULL;
}

Test(timetravel, a_point_beyond_the_readable_horizon_waits_then_answers_or_gives_503)
{
	char pos[64], path[256];
	struct held h;
	struct response r;
	struct pending p;
	pthread_t t;
	PGresult *now;

	open_account("w", 0);
	hold(&h);
	cr_assert_eq(write_("/accounts/w/deposits", "{\"amount\":7}", pos, sizeof(pos)), 201);
	now = sql(stack.db,
		  "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
		  "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), to_char((clock_timestamp() + interval "
		  "'1 day') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");

	/* The deposit committed, but a transaction below it is still running: neither its
	 * token nor the present time is stable yet. */
	snprintf(path, sizeof(path), "/accounts/w?as_of=%s&wait_ms=150", pos);
	r = get(path);
	cr_assert_eq(r.status, 503, "%s: %d %s", path, r.status, r.body);
	cr_assert_str_eq(jstr(r.json, "code"), "projection_behind");
	response_free(&r);
	snprintf(path, sizeof(path), "/accounts/w?at=%s&wait_ms=150", PQgetvalue(now, 0, 0));
	r = get(path);
	cr_assert_eq(r.status, 503, "%s: %d %s", path, r.status, r.body);
	cr_assert_str_eq(jstr(r.json, "code"), "projection_behind");
	response_free(&r);
	/* A time in the future is not known yet either. */
	snprintf(path, sizeof(path), "/accounts/w/transactions?at=%s&wait_ms=100",
		 PQgetvalue(now, 0, 1));
	r = get(path);
	cr_assert_eq(r.status, 503, "%s: %d %s", path, r.status, r.body);
	response_free(&r);

	/* A waiting read answers as soon as the horizon passes the point. */
	snprintf(p.path, sizeof(p.path), "/accounts/w?as_of=%s&wait_ms=10000", pos);
	cr_assert_eq(pthread_create(&t, NULL, get_in_thread, &p), 0);
	{ /* the read waits in the waiting room before the horizon moves */
		double end = harness_now() + 20;
		while (harness_metric(&stack.query, "daybook_query_waiting_reads") < 1 &&
		       harness_now() < end)
			usleep(10000);
		cr_assert_geq(harness_metric(&stack.query, "daybook_query_waiting_reads"), 1);
	}
	release(&h);
	pthread_join(t, NULL);
	cr_assert_eq(p.r.status, 200, "%s: %d %s", p.path, p.r.status, p.r.body);
	cr_assert_eq(jint(p.r.json, "balance"), 7, "%s", p.r.body);
	cr_assert_eq(jint(p.r.json, "version"), 2, "%s", p.r.body);
	response_free(&p.r);
	snprintf(path, sizeof(path), "/accounts/w?at=%s&" WAIT, PQgetvalue(now, 0, 0));
	r = get(path);
	cr_assert_eq(r.status, 200, "%s: %d %s", path, r.status, r.body);
	cr_assert_eq(jint(r.json, "balance"), 7, "%s", r.body);
	response_free(&r);
	PQclear(now);
}

Test(timetravel, malformed_or_conflicting_parameters_are_refused_naming_them)
{
	static const struct {
		const char *path, *names;
	} cases[] = {
		{ "/accounts/a?as_of=abc", "'as_of'" },
		{ "/accounts/a?as_of=12", "'as_of'" },
		{ "/accounts/a?as_of=", "'as_of'" },
		{ "/accounts/a?at=yesterday", "'at'" },
		{ "/accounts/a?at=2026-13-01T00:00:00Z", "'at'" },
		{ "/accounts/a?at=2026-02-29T00:00:00Z", "'at'" },
		{ "/accounts/a?at=2026-01-01T00:00:00", "'at'" },
		{ "/accounts/a?at=2026-01-01T24:00:00Z", "'at'" },
		{ "/accounts/a/transactions?at=2026-01-01", "'at'" },
		{ "/accounts/a/transactions?as_of=1.x", "'as_of'" },
		{ "/accounts/a?as_of=1.2&at=2026-01-01T00:00:00Z", "'as_of' and 'at'" },
		{ "/accounts/a?as_of=1.2&min_position=1.2", "'as_of'" },
		{ "/accounts/a/transactions?at=2026-01-01T00:00:00Z&min_position=1.2", "'at'" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct response r = get(cases[i].path);
		cr_assert_eq(r.status, 400, "%s: %d %s", cases[i].path, r.status, r.body);
		cr_assert_str_eq(jstr(r.json, "code"), "invalid_request", "%s", cases[i].path);
		cr_assert(strstr(jstr(r.json, "detail"), cases[i].names), "%s: %s", cases[i].path,
			  r.body);
		response_free(&r);
	}
	/* Offsets and fractions are accepted (a '+' sent unencoded reads as a space). */
	const char *ok[] = { "/accounts/a?at=2026-01-01T01:00:00.123456789%2B01:00",
			     "/accounts/a?at=2026-01-01T01:00:00+01:00",
			     "/accounts/a?at=2025-12-31t23:00:00-01:00" };
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		struct response r = get(ok[i]);
		cr_assert_eq(r.status, 404, "%s: %d %s", ok[i], r.status, r.body);
		response_free(&r);
	}
}

/* A token's position is a bigint in the event store: one past it is a malformed as_of
 * (400), not a statement that fails (a 500, which in the SQL pool's pipeline also
 * aborts the reads queued behind it in the same batch). */
Test(timetravel, an_as_of_position_beyond_a_bigint_is_refused_as_malformed)
{
	const char *bad[] = { "/accounts/a?as_of=1.9223372036854775808",
			      "/accounts/a/transactions?as_of=1.9999999999999999999" };
	struct response r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		r = get(bad[i]);
		cr_assert_eq(r.status, 400, "%s: %d %s", bad[i], r.status, r.body);
		cr_assert(strstr(jstr(r.json, "detail"), "'as_of'"), "%s: %s", bad[i], r.body);
		response_free(&r);
	}
	r = get("/accounts/a?as_of=1.9223372036854775807");
	cr_assert_eq(r.status, 404, "%d %s", r.status, r.body);
	response_free(&r);
}

/* A time further ahead than wait_ms cannot become stable in time: 503 at once, not
 * after wait_ms of looking at the event store every 50 ms (200 statements for one read
 * with wait_ms=10000, on the SQL pool that every fallback read shares). */
Test(timetravel, a_time_beyond_the_wait_is_refused_at_once)
{
	char path[160], at[40];
	time_t later = time(NULL) + 3600;
	struct tm tm;
	double t0;
	struct response r;

	gmtime_r(&later, &tm);
	strftime(at, sizeof(at), "%Y-%m-%dT%H:%M:%SZ", &tm);
	snprintf(path, sizeof(path), "/accounts/a?at=%s&wait_ms=10000", at);
	t0 = harness_now();
	r = get(path);
	cr_assert_eq(r.status, 503, "%d %s", r.status, r.body);
	cr_assert_str_eq(jstr(r.json, "code"), "projection_behind");
	cr_assert(harness_now() - t0 < 2.0, "answered after %.1f s", harness_now() - t0);
	response_free(&r);
}

/* A long stream: more than two snapshots' worth of events. */
static void long_history(int n)
{
	open_account("long", 0);
	for (int i = 1; i < n; i++)
		cr_assert_eq(money("long", (i % 5 == 4) ? "withdrawals" : "deposits", i % 50 + 1),
			     201);
}

Test(timetravel, snapshots_bound_the_fold_and_a_refused_one_only_costs_time)
{
	struct log lg;
	int idx[] = { 999, 1000, 1001, 1500, 1999, 2000, 2050, 2099 };
	PGresult *r;

	long_history(2100);
	cr_assert_geq(sql_int(stack.db,
			      "SELECT count(*) FROM account_snapshots WHERE stream = 'account-long'"),
		      2);
	load_log(&lg);
	cr_assert_eq(lg.n, 2100);
	for (size_t k = 0; k < sizeof(idx) / sizeof(idx[0]); k++) {
		const struct ev *e = &lg.e[idx[k]];
		struct point tok = { false, e->txid, e->position, 0 };
		struct point at = { true, 0, 0, e->at_us };
		check_account(&lg, "long", &tok, NULL);
		check_account(&lg, "long", &at, e->at);
	}
	check_statement(&lg, "long",
			&(struct point){ false, lg.e[1500].txid, lg.e[1500].position, 0 }, NULL,
			500);

	/* A planted snapshot of a plausible shape shows through: the fold starts there. */
	PQclear(sql(stack.db,
		    "INSERT INTO account_snapshots VALUES ('account-long', 1500, "
		    "'{\"account_id\":\"long\",\"currency\":\"EUR\",\"balance\":123456789,"
		    "\"overdraft_limit\":0,\"version\":1500,\"closed\":false}')"));
	{
		char path[128];
		struct response resp;
		snprintf(path, sizeof(path), "/accounts/long?as_of=%llu.%llu&" WAIT,
			 lg.e[1500].txid, lg.e[1500].position);
		resp = get(path);
		cr_assert_eq(resp.status, 200, "%s", resp.body);
		cr_assert_eq(jint(resp.json, "balance"), 123456789 + lg.e[1500].amount, "%s",
			     resp.body);
		response_free(&resp);
	}
	PQclear(sql(stack.db,
		    "DELETE FROM account_snapshots WHERE stream = 'account-long' AND version = 1500"));

	/* Snapshots that cannot be used: another account's (with a balance that would show
	 * if it were used), a state at another version, one that does not decode. Every
	 * answer is still the fold's. */
	r = sql(stack.db,
		"UPDATE account_snapshots SET state = jsonb_set(jsonb_set(state, '{account_id}', "
		"'\"other\"'), '{balance}', '1') WHERE stream = 'account-long' AND version = 1000");
	PQclear(r);
	r = sql(stack.db, "UPDATE account_snapshots SET state = jsonb_set(state, '{version}', '7') "
			  "WHERE stream = 'account-long' AND version = 2000");
	PQclear(r);
	PQclear(sql(stack.db,
		    "INSERT INTO account_snapshots VALUES ('account-long', 1700, '{\"balance\":1}')"));
	for (size_t k = 0; k < sizeof(idx) / sizeof(idx[0]); k++) {
		const struct ev *e = &lg.e[idx[k]];
		struct point tok = { false, e->txid, e->position, 0 };
		struct point at = { true, 0, 0, e->at_us };
		check_account(&lg, "long", &tok, NULL);
		check_account(&lg, "long", &at, e->at);
	}
	check_statement(&lg, "long", &(struct point){ true, 0, 0, lg.e[2050].at_us }, lg.e[2050].at,
			500);
	cr_assert(harness_log_says(&stack.query, "ignoring the snapshot of account-long"),
		  "the refused snapshot was not reported");
	free(lg.e);
}
