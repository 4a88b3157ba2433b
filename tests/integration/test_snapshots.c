/* Account snapshots: written with the events every thousandth version, used to load an
 * account from its newest snapshot and the events after it, checked before use. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define PERMISSION_DENIED "42501"

static struct stack stack;

static void setup(void)
{
	harness_stack_command(&stack);
}

static void teardown(void)
{
	harness_stack_stop(&stack);
}

TestSuite(snapshots, .init = setup, .fini = teardown, .timeout = 240);

static void open_account(const char *id, long long overdraft)
{
	char body[256];
	struct response r;

	snprintf(body, sizeof(body),
		 "{\"id\":\"%s\",\"name\":\"S\",\"currency\":\"EUR\","
		 "\"overdraft_limit\":%lld}",
		 id, overdraft);
	r = post(&stack.command, "/accounts", body, NULL);
	cr_assert_eq(r.status, 201, "opening %s: %d %s", id, r.status, r.body);
	response_free(&r);
}

/* Deposit and return the response (status checked by the caller). */
static struct response deposit(const char *id, long long amount)
{
	char path[128], body[64];

	snprintf(path, sizeof(path), "/accounts/%s/deposits", id);
	snprintf(body, sizeof(body), "{\"amount\":%lld}", amount);
	return post(&stack.command, path, body, NULL);
}

static void deposit_ok(const char *id, long long amount)
{
	struct response r = deposit(id, amount);

	cr_assert_eq(r.status, 201, "deposit to %s: %d %s", id, r.status, r.body);
	response_free(&r);
}

/* A deposit's answer: the version and balance the service decided on. */
static void assert_deposit_gives(const char *id, long long amount, long long version,
				 long long balance)
{
	struct response r = deposit(id, amount);

	cr_assert_eq(r.status, 201, "deposit to %s: %d %s", id, r.status, r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), version, "%s: %s", id,
		     r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), balance, "%s: %s", id,
		     r.body);
	response_free(&r);
}

/* Restart the command service: its account cache starts cold. */
static void restart(void)
{
	cr_assert_eq(harness_stop(&stack.command), 0);
	harness_start_command(&stack.command, stack.db);
}

struct depositor {
	int port, n, first;
	int failed;
};

static void *deposit_many(void *arg)
{
	struct depositor *d = arg;
	const char *h[] = { "Authorization: Bearer " TOKEN_WRITE, "Content-Type: application/json",
			    NULL };
	char body[64];

	for (int i = 0; i < d->n; i++) {
		snprintf(body, sizeof(body), "{\"amount\":%d}", (d->first + i) % 7 + 1);
		struct response r = http_request(d->port, "POST", "/accounts/long/deposits", h,
						 body, 30);
		if (r.status != 201)
			d->failed++;
		response_free(&r);
	}
	return NULL;
}

Test(snapshots, a_long_stream_gets_a_snapshot_every_thousand_versions_and_loads_from_it)
{
	struct depositor d[4];
	pthread_t t[4];
	PGresult *r;
	long long total;

	open_account("long", 0);
	/* Concurrent deposits: a batch often holds several of the account's events, and a
	 * thousandth version may fall anywhere in it. */
	for (int i = 0; i < 4; i++) {
		d[i] = (struct depositor){ .port = stack.command.port,
					   .n = i < 3 ? 625 : 624,
					   .first = i * 625 };
		pthread_create(&t[i], NULL, deposit_many, &d[i]);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		cr_assert_eq(d[i].failed, 0);
	}
	cr_assert_eq(sql_int(stack.db,
			     "SELECT max(version) FROM events WHERE stream = 'account-long'"),
		     2500);

	/* Exactly the thousandth versions, each the fold of the log up to it. */
	r = sql(stack.db,
		"SELECT s.version, s.state = jsonb_build_object('account_id', 'long', 'currency', "
		"'EUR', 'balance', (SELECT sum((e.data->>'amount')::bigint) FROM events e WHERE "
		"e.stream = s.stream AND e.version <= s.version AND e.type = 'FundsDeposited'), "
		"'overdraft_limit', 0, 'version', s.version, 'closed', false), s.state::text "
		"FROM account_snapshots s WHERE s.stream = 'account-long' ORDER BY s.version");
	cr_assert_eq(PQntuples(r), 2);
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "1000");
	cr_assert_str_eq(PQgetvalue(r, 1, 0), "2000");
	cr_assert_str_eq(PQgetvalue(r, 0, 1), "t", "snapshot 1000 is not the fold: %s",
			 PQgetvalue(r, 0, 2));
	cr_assert_str_eq(PQgetvalue(r, 1, 1), "t", "snapshot 2000 is not the fold: %s",
			 PQgetvalue(r, 1, 2));
	PQclear(r);

	/* A cold service loads snapshot 2000 and events 2001-2500, and decides right. */
	total = sql_int(stack.db, "SELECT sum((data->>'amount')::bigint) FROM events "
				  "WHERE stream = 'account-long' AND type = 'FundsDeposited'");
	restart();
	assert_deposit_gives("long", 5, 2501, total + 5);
}

Test(snapshots, loading_reads_the_newest_snapshot_and_only_the_events_after_it)
{
	open_account("snap", 0);
	for (int i = 0; i < 4; i++)
		deposit_ok("snap", 10);
	/* The log says balance 40 at version 5. A snapshot at version 3 that says 1000
	 * (the log: 20) passes every check: if the load used the whole log, the answer
	 * would be 41; from the snapshot and events 4 and 5 it is 1021. An older one at
	 * version 2 (saying 7) must lose to the newer. */
	PQclear(sql(stack.db,
		    "INSERT INTO account_snapshots (stream, version, state) VALUES "
		    "('account-snap', 2, '{\"account_id\":\"snap\",\"currency\":\"EUR\",\"balance\":7,"
		    "\"overdraft_limit\":0,\"version\":2,\"closed\":false}'), "
		    "('account-snap', 3, '{\"account_id\":\"snap\",\"currency\":\"EUR\",\"balance\":1000,"
		    "\"overdraft_limit\":0,\"version\":3,\"closed\":false}')"));
	restart();
	assert_deposit_gives("snap", 1, 6, 1021);
	cr_assert(!harness_log_says(&stack.command, "ignoring the snapshot"));
}

/* State JSON for a snapshot row, from its parts. */
static void insert_snapshot(const char *stream, int version, const char *state)
{
	char q[1024];

	snprintf(q, sizeof(q),
		 "INSERT INTO account_snapshots "
		 "(stream, version, state) VALUES ('%s', %d, '%s')",
		 stream, version, state);
	PQclear(sql(stack.db, q));
}

Test(snapshots, a_snapshot_that_fails_its_checks_is_ignored_and_the_stream_folded_from_the_start)
{
	static const char *const bad[] = { "other-id",    "wrong-version", "ahead",
					   "below-limit", "garbage",       "closed-nonzero" };
	const size_t nbad = sizeof(bad) / sizeof(bad[0]);
	char state[512];
	struct response r;

	for (size_t i = 0; i < nbad; i++) {
		open_account(bad[i], 0);
		deposit_ok(bad[i], 10);
		deposit_ok(bad[i], 10); /* version 3, balance 20 */
	}
	open_account("good", 0);
	deposit_ok("good", 10); /* version 2, balance 10 */
	/* Each is wrong in one way; each would make the account's balance 500 if used. */
	insert_snapshot("account-other-id", 2,
			"{\"account_id\":\"good\",\"currency\":\"EUR\","
			"\"balance\":500,\"overdraft_limit\":0,\"version\":2,\"closed\":false}");
	insert_snapshot(
		"account-wrong-version", 2,
		"{\"account_id\":\"wrong-version\",\"currency\":"
		"\"EUR\",\"balance\":500,\"overdraft_limit\":0,\"version\":3,\"closed\":false}");
	insert_snapshot("account-ahead", 9,
			"{\"account_id\":\"ahead\",\"currency\":\"EUR\","
			"\"balance\":500,\"overdraft_limit\":0,\"version\":9,\"closed\":false}");
	insert_snapshot(
		"account-below-limit", 2,
		"{\"account_id\":\"below-limit\",\"currency\":"
		"\"EUR\",\"balance\":-500,\"overdraft_limit\":0,\"version\":2,\"closed\":false}");
	insert_snapshot("account-garbage", 2, "{\"balance\":500}");
	insert_snapshot("account-closed-nonzero", 2,
			"{\"account_id\":\"closed-nonzero\",\"currency\":"
			"\"EUR\",\"balance\":500,\"overdraft_limit\":0,\"version\":2,\"closed\":true}");
	/* A snapshot of an account that was never opened. */
	insert_snapshot("account-ghost", 1,
			"{\"account_id\":\"ghost\",\"currency\":\"EUR\","
			"\"balance\":500,\"overdraft_limit\":0,\"version\":1,\"closed\":false}");
	/* A sound one, for an account loaded in the same batch as a refused one. */
	snprintf(state, sizeof(state),
		 "{\"account_id\":\"good\",\"currency\":\"EUR\",\"balance\":10,"
		 "\"overdraft_limit\":0,\"version\":2,\"closed\":false}");
	insert_snapshot("account-good", 2, state);
	restart();

	r = post(&stack.command, "/transfers",
		 "{\"id\":\"t1\",\"from\":\"good\",\"to\":\"other-id\",\"amount\":4}", NULL);
	cr_assert_eq(r.status, 201, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "from_version")), 3);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "to_version")), 4);
	response_free(&r);
	assert_deposit_gives("other-id", 1, 5, 25);
	assert_deposit_gives("good", 1, 4, 7);
	for (size_t i = 1; i < nbad; i++)
		assert_deposit_gives(bad[i], 1, 4, 21);
	r = deposit("ghost", 1);
	cr_assert_eq(r.status, 404, "%d %s", r.status, r.body);
	response_free(&r);
	for (size_t i = 0; i < nbad; i++) {
		char text[128];
		snprintf(text, sizeof(text), "ignoring the snapshot of account-%s", bad[i]);
		cr_assert(harness_log_says(&stack.command, text), "no warning for %s", bad[i]);
	}
	cr_assert(harness_log_says(&stack.command, "ignoring the snapshot of account-ghost"));
	cr_assert(!harness_log_says(&stack.command, "ignoring the snapshot of account-good"));
}

struct outcome {
	char sqlstate[6]; /* "" on success */
};

static struct outcome run_as(const char *role, const char *query)
{
	struct outcome out = { "" };
	char conninfo[512];
	PGconn *conn;
	PGresult *r;

	harness_conninfo(stack.db, role, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting as %s: %s", role,
		  PQerrorMessage(conn));
	r = PQexec(conn, query);
	if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
		const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
		snprintf(out.sqlstate, sizeof(out.sqlstate), "%s", state ? state : "?????");
	}
	PQclear(r);
	PQfinish(conn);
	return out;
}

Test(snapshots, the_command_role_only_adds_snapshots_and_readers_only_read_them)
{
	static const char *const readers[] = { "daybook_projector", "daybook_query" };
	const char *insert = "INSERT INTO account_snapshots (stream, version, state) VALUES "
			     "('account-r', 1, '{}')";

	open_account("r", 0);
	cr_assert_str_eq(run_as("daybook_command", insert).sqlstate, "");
	cr_assert_str_eq(run_as("daybook_command", "SELECT * FROM account_snapshots").sqlstate, "");
	cr_assert_str_eq(run_as("daybook_command", "UPDATE account_snapshots SET state = '{}'")
				 .sqlstate,
			 PERMISSION_DENIED);
	cr_assert_str_eq(run_as("daybook_command", "DELETE FROM account_snapshots").sqlstate,
			 PERMISSION_DENIED);
	cr_assert_str_eq(run_as("daybook_command", "TRUNCATE account_snapshots").sqlstate,
			 PERMISSION_DENIED);
	for (size_t i = 0; i < 2; i++) {
		cr_assert_str_eq(run_as(readers[i], "SELECT * FROM account_snapshots").sqlstate,
				 "");
		cr_assert_str_eq(run_as(readers[i], insert).sqlstate, PERMISSION_DENIED);
		cr_assert_str_eq(run_as(readers[i], "DELETE FROM account_snapshots").sqlstate,
				 PERMISSION_DENIED);
	}
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM account_snapshots"), 1);
}

Test(snapshots, an_account_loaded_from_a_long_unsnapshotted_history_gets_a_snapshot)
{
	/* 1,500 events that no snapshot covers (as an older binary would leave them). */
	PQclear(sql(stack.db,
		    "INSERT INTO events (stream, version, type, data, metadata) "
		    "SELECT 'account-old', 1, 'AccountOpened', '{\"account_id\":\"old\",\"name\":\"O\","
		    "\"currency\":\"EUR\",\"overdraft_limit\":0}'::jsonb, '{}'::jsonb UNION ALL "
		    "SELECT 'account-old', v, 'FundsDeposited', '{\"amount\":2}', '{}' "
		    "FROM generate_series(2, 1500) v ORDER BY 2"));
	assert_deposit_gives("old", 1, 1501, 2999);
	/* The state it loaded, at version 1500, is now a snapshot: the next load is short. */
	cr_assert_eq(
		sql_int(stack.db,
			"SELECT count(*) FROM account_snapshots WHERE stream = 'account-old' "
			"AND version = 1500 AND state = '{\"account_id\":\"old\",\"currency\":\"EUR\","
			"\"balance\":2998,\"overdraft_limit\":0,\"version\":1500,\"closed\":false}'"),
		1);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM account_snapshots"), 1);
	restart();
	assert_deposit_gives("old", 1, 1502, 3000);
	cr_assert_eq(sql_int(stack.db, "SELECT count(*) FROM account_snapshots"), 1,
		     "a load from a recent snapshot needs no other");
}
