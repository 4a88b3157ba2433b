/* The event store's guarantees in PostgreSQL itself: least-privilege service roles,
 * append-only triggers, gap-free versions, unique (stream, version) and transfer ids. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

#define PERMISSION_DENIED "42501"
#define UNIQUE_VIOLATION "23505"
#define INTEGRITY_VIOLATION "23000"
#define CHECK_VIOLATION "23514"

static const char *const service_roles[] = { "daybook_command", "daybook_projector",
					     "daybook_query" };

static char db[64];

/* Every test starts from a fresh database holding one event: account-x opened. */
static void setup(void)
{
	harness_db_create(db, sizeof(db));
	PQclear(sql(db,
		    "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		    "('account-x', 1, 'AccountOpened', '{\"account_id\":\"x\",\"name\":\"X\","
		    "\"currency\":\"EUR\",\"overdraft_limit\":0}', '{\"request_id\":\"setup\"}')"));
}

TestSuite(roles, .init = setup, .timeout = 60);

struct outcome {
	char sqlstate[6]; /* "" on success */
	char message[512];
};

/* Run one statement on db as role (NULL: the superuser), expecting it may fail. */
static struct outcome run_as(const char *role, const char *query)
{
	struct outcome out = { "", "" };
	char conninfo[512];
	PGconn *conn;
	PGresult *r;

	harness_conninfo(db, role, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting as %s: %s",
		  role ? role : "superuser", PQerrorMessage(conn));
	r = PQexec(conn, query);
	if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
		const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
		snprintf(out.sqlstate, sizeof(out.sqlstate), "%s", state ? state : "?????");
		snprintf(out.message, sizeof(out.message), "%s", PQresultErrorMessage(r));
	}
	PQclear(r);
	PQfinish(conn);
	return out;
}

static void assert_refused(const char *role, const char *query, const char *sqlstate)
{
	struct outcome o = run_as(role, query);

	cr_assert_str_eq(o.sqlstate, sqlstate, "%s as %s: expected SQLSTATE %s, got '%s' %s", query,
			 role ? role : "superuser", sqlstate, o.sqlstate, o.message);
}

static void assert_allowed(const char *role, const char *query)
{
	struct outcome o = run_as(role, query);

	cr_assert_str_eq(o.sqlstate, "", "%s as %s was refused: %s", query,
			 role ? role : "superuser", o.message);
}

/* The log still holds exactly the setup event, unchanged. */
static void assert_log_untouched(void)
{
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events"), 1);
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM events WHERE stream = 'account-x' AND "
			     "version = 1 AND type = 'AccountOpened' AND data ->> 'name' = 'X'"),
		     1);
}

static const char *const changes[] = {
	"UPDATE events SET data = '{\"account_id\":\"x\",\"name\":\"Mallory\",\"currency\":"
	"\"EUR\",\"overdraft_limit\":0}'",
	"DELETE FROM events",
	"TRUNCATE events",
};

Test(roles, service_roles_cannot_update_delete_or_truncate_events)
{
	for (size_t r = 0; r < sizeof(service_roles) / sizeof(service_roles[0]); r++)
		for (size_t c = 0; c < sizeof(changes) / sizeof(changes[0]); c++)
			assert_refused(service_roles[r], changes[c], PERMISSION_DENIED);
	assert_log_untouched();
}

Test(roles, projector_and_query_cannot_append)
{
	const char *insert = "INSERT INTO events (stream, version, type, data, metadata) VALUES "
			     "('account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}')";

	assert_refused("daybook_projector", insert, PERMISSION_DENIED);
	assert_refused("daybook_query", insert, PERMISSION_DENIED);
	assert_log_untouched();
}

Test(roles, projector_and_query_can_read_the_log)
{
	assert_allowed("daybook_projector", "SELECT position, stream, version, data FROM events");
	assert_allowed("daybook_query", "SELECT position, stream, version, data FROM events");
}

Test(roles, command_can_append_and_read)
{
	PGresult *r;

	assert_allowed(
		"daybook_command",
		"INSERT INTO events (stream, version, type, data, metadata) VALUES "
		"('account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{\"request_id\":\"r\"}')");
	assert_allowed("daybook_command", "SELECT version FROM events WHERE stream = 'account-x'");
	r = sql(db, "SELECT version, type, data ->> 'amount' FROM events ORDER BY position");
	cr_assert_eq(PQntuples(r), 2);
	cr_assert_str_eq(PQgetvalue(r, 1, 0), "2");
	cr_assert_str_eq(PQgetvalue(r, 1, 1), "FundsDeposited");
	cr_assert_str_eq(PQgetvalue(r, 1, 2), "5");
	PQclear(r);
}

Test(roles, command_cannot_touch_other_tables_it_was_not_granted)
{
	/* Least privilege: no DDL, and no way around the log's append-only rule. */
	assert_refused("daybook_command", "CREATE TABLE public.sneaky (x int)", PERMISSION_DENIED);
	assert_refused("daybook_command", "ALTER TABLE events DISABLE TRIGGER USER",
		       PERMISSION_DENIED);
	assert_refused("daybook_command", "DROP TABLE events", PERMISSION_DENIED);
	assert_log_untouched();
}

Test(roles, even_the_superuser_cannot_change_the_log)
{
	for (size_t c = 0; c < sizeof(changes) / sizeof(changes[0]); c++) {
		struct outcome o = run_as(NULL, changes[c]);
		cr_assert_str_eq(o.sqlstate, PERMISSION_DENIED, "%s as superuser: '%s' %s",
				 changes[c], o.sqlstate, o.message);
		cr_assert_not_null(strstr(o.message, "append-only"),
				   "refused by the trigger, not by a grant: %s", o.message);
	}
	assert_log_untouched();
}

Test(roles, a_version_gap_is_refused)
{
	struct outcome o =
		run_as(NULL, "INSERT INTO events (stream, version, type, data, metadata) "
			     "VALUES ('account-x', 3, 'FundsDeposited', '{\"amount\":5}', '{}')");

	cr_assert_str_eq(o.sqlstate, INTEGRITY_VIOLATION, "got '%s' %s", o.sqlstate, o.message);
	assert_log_untouched();
	/* A stream starts at 1, too. */
	assert_refused(NULL,
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-y', 2, 'FundsDeposited', '{\"amount\":5}', '{}')",
		       INTEGRITY_VIOLATION);
	assert_log_untouched();
}

/* The gap-free check runs once per statement (sql/013) over all of its rows: versions
 * that follow one another within one INSERT pass, as the command's set-based append
 * needs; a gap anywhere among them, or versions out of order in the log, refuses the
 * whole statement. */
Test(roles, versions_are_checked_across_the_rows_of_one_statement)
{
	assert_refused("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}'), "
		       "('account-x', 4, 'FundsDeposited', '{\"amount\":5}', '{}')",
		       INTEGRITY_VIOLATION);
	assert_refused("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) "
		       "SELECT 'account-x', v, 'FundsDeposited', '{\"amount\":5}', '{}' "
		       "FROM unnest(ARRAY[3, 2]) AS v",
		       INTEGRITY_VIOLATION);
	assert_log_untouched();
	assert_allowed("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}'), "
		       "('account-x', 3, 'FundsDeposited', '{\"amount\":5}', '{}'), "
		       "('account-z', 1, 'AccountOpened', '{\"account_id\":\"z\"}', '{}'), "
		       "('account-z', 2, 'FundsDeposited', '{\"amount\":5}', '{}')");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events"), 5);
}

/* Notifications on daybook_events that reach listener within a second. */
static int wake_ups(PGconn *listener)
{
	int n = 0;
	PGnotify *note;

	for (double end = harness_now() + 1; harness_now() < end; usleep(10000)) {
		cr_assert(PQconsumeInput(listener), "%s", PQerrorMessage(listener));
		while ((note = PQnotifies(listener))) {
			n += strcmp(note->relname, "daybook_events") == 0 && note->extra[0] == '\0';
			PQfreemem(note);
		}
	}
	return n;
}

/* The append's wake-up for followers (the projector, waiting feed readers): one
 * NOTIFY daybook_events per appending statement, at commit, none for an append the
 * version check refuses. sql/016 moved it into the check's trigger. */
Test(roles, an_append_wakes_followers_once_it_commits)
{
	PGconn *listener = harness_connect_as(db, "daybook_projector");
	PGconn *cmd = harness_connect_as(db, "daybook_command");
	char code[6];

	PQclear(PQexec(listener, "LISTEN daybook_events"));
	PQclear(PQexec(cmd, "BEGIN"));
	cr_assert_str_eq(
		harness_sqlstate(cmd,
				 "INSERT INTO events (stream, version, type, data, metadata) "
				 "VALUES ('account-x', 2, 'FundsDeposited', '{\"amount\":5}', "
				 "'{}'), ('account-x', 3, 'FundsDeposited', '{\"amount\":5}', '{}')",
				 code),
		"");
	cr_assert_eq(wake_ups(listener), 0, "woken before the commit");
	PQclear(PQexec(cmd, "COMMIT"));
	cr_assert_eq(wake_ups(listener), 1, "one wake-up for one appending statement");
	cr_assert_str_eq(
		harness_sqlstate(cmd,
				 "INSERT INTO events (stream, version, type, data, metadata) "
				 "VALUES ('account-x', 5, 'FundsDeposited', '{\"amount\":5}', '{}')",
				 code),
		INTEGRITY_VIOLATION);
	cr_assert_eq(wake_ups(listener), 0, "woken by a refused append");
	/* PostgreSQL folds identical notifications of one transaction into one, so the
	 * count above cannot tell one NOTIFY from two: that each append runs one statement
	 * trigger (the version check, which also wakes) is read from the catalog. */
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass "
			     "AND NOT tgisinternal AND tgenabled <> 'D' AND tgtype & 1 = 0 "
			     "AND tgtype & 4 <> 0"),
		     1, "an append runs more than one statement trigger");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM pg_proc WHERE proname = 'events_notify'"),
		     0);
	PQfinish(cmd);
	PQfinish(listener);
}

/* Stream names as the store takes them, in the log and in the snapshots alike:
 * ^[a-z]+-[A-Za-z0-9._:-]{1,64}$ (sql/001, sql/008; sql/014 checks it without the
 * counted repetition). Each name is an SQL expression. */
static const char *const good_streams[] = {
	"'account-' || repeat('a', 64)",
	"'account-A'",
	"'x-' || 'Az09._:-'",
	"'account--'",
	"'account-a-b-c'",
	"'a-' || repeat('-', 64)",
};
static const char *const bad_streams[] = {
	"'account-' || repeat('a', 65)",
	"'account-'",
	"'account'",
	"'-abc'",
	"'Account-x'",
	"'acc0unt-x'",
	"'account-x/y'",
	"'account-x y'",
	"'account-x' || chr(10)",
	"chr(10) || 'account-x'",
	"'account-' || chr(233)",
	"'a-' || repeat('-', 65)",
};

static void check_stream(const char *stream, bool good)
{
	char event[512], snapshot[512];

	snprintf(event, sizeof(event),
		 "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		 "(%s, 1, 'AccountOpened', '{\"account_id\":\"n\"}', '{}')",
		 stream);
	snprintf(snapshot, sizeof(snapshot),
		 "INSERT INTO account_snapshots (stream, version, state) VALUES (%s, 1, '{}')",
		 stream);
	if (good) {
		assert_allowed("daybook_command", event);
		assert_allowed("daybook_command", snapshot);
	} else {
		assert_refused("daybook_command", event, CHECK_VIOLATION);
		assert_refused("daybook_command", snapshot, CHECK_VIOLATION);
	}
}

Test(roles, stream_names_are_checked_at_their_edges)
{
	for (size_t i = 0; i < sizeof(good_streams) / sizeof(good_streams[0]); i++)
		check_stream(good_streams[i], true);
	for (size_t i = 0; i < sizeof(bad_streams) / sizeof(bad_streams[0]); i++)
		check_stream(bad_streams[i], false);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events"),
		     1 + (long long)(sizeof(good_streams) / sizeof(good_streams[0])));
}

Test(roles, a_duplicate_stream_version_is_refused)
{
	assert_refused("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-x', 1, 'FundsDeposited', '{\"amount\":5}', '{}')",
		       UNIQUE_VIOLATION);
	assert_log_untouched();
}

Test(roles, a_transfer_id_is_used_once)
{
	const char *open_y = "INSERT INTO events (stream, version, type, data, metadata) VALUES "
			     "('account-y', 1, 'AccountOpened', '{\"account_id\":\"y\",\"name\":"
			     "\"Y\",\"currency\":\"EUR\",\"overdraft_limit\":100}', '{}')";

	assert_allowed("daybook_command", open_y);
	assert_allowed("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-x', 2, 'TransferSent', '{\"transfer_id\":\"t-1\",\"to\":\"y\","
		       "\"amount\":5}', '{}')");
	/* The same id sent from another account (a different stream and version). */
	assert_refused("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-y', 2, 'TransferSent', '{\"transfer_id\":\"t-1\",\"to\":\"x\","
		       "\"amount\":7}', '{}')",
		       UNIQUE_VIOLATION);
	/* The receiving side carries the same id: that is the one allowed repeat. */
	assert_allowed("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-y', 2, 'TransferReceived', '{\"transfer_id\":\"t-1\",\"from\":"
		       "\"x\",\"amount\":5}', '{}')");
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM events WHERE data ->> 'transfer_id' = 't-1'"),
		     2);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM events WHERE type = 'TransferSent'"), 1);
}

Test(roles, command_cannot_choose_txid_position_or_recorded_at)
{
	static const char *const forged[] = {
		"INSERT INTO events (txid, stream, version, type, data, metadata) VALUES "
		"('1'::xid8, 'account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}')",
		"INSERT INTO events (position, stream, version, type, data, metadata) OVERRIDING "
		"SYSTEM VALUE VALUES (1000000, 'account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}')",
		"INSERT INTO events (recorded_at, stream, version, type, data, metadata) VALUES "
		"('2000-01-01', 'account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}')",
	};

	for (size_t i = 0; i < sizeof(forged) / sizeof(forged[0]); i++)
		assert_refused("daybook_command", forged[i], PERMISSION_DENIED);
	assert_log_untouched();
	/* The columns it decides are still its own. */
	assert_allowed("daybook_command",
		       "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		       "('account-x', 2, 'FundsDeposited', '{\"amount\":5}', '{}')");
}

Test(roles, no_service_role_can_create_temporary_tables_or_objects)
{
	static const char *const creations[] = {
		"CREATE TEMP TABLE events (x int)",
		"CREATE TABLE public.sneaky (x int)",
		"CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
		"CREATE SCHEMA sneaky",
	};

	for (size_t r = 0; r < sizeof(service_roles) / sizeof(service_roles[0]); r++)
		for (size_t c = 0; c < sizeof(creations) / sizeof(creations[0]); c++)
			assert_refused(service_roles[r], creations[c], PERMISSION_DENIED);
}

Test(roles, every_function_pins_its_search_path)
{
	PGresult *r = sql(db, "SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON "
			      "n.oid = p.pronamespace WHERE n.nspname = 'public' AND NOT EXISTS "
			      "(SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')");

	for (int i = 0; i < PQntuples(r); i++)
		fprintf(stderr, "function without a pinned search_path: %s\n", PQgetvalue(r, i, 0));
	cr_assert_eq(PQntuples(r), 0, "%d function(s) without a pinned search_path", PQntuples(r));
	PQclear(r);
	/* Trigger functions above all, and they exist (the check above is not vacuous):
	 * events_refuse_change and events_check_versions (which took events_notify's
	 * NOTIFY in sql/016). */
	cr_assert_geq(sql_int(db, "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = "
				  "p.pronamespace WHERE n.nspname = 'public' AND p.prorettype = "
				  "'trigger'::regtype AND 'search_path=public, pg_temp' = "
				  "ANY (p.proconfig)"),
		      2);
}

/* sql/017: the SQL model of transfers is a view of the log. A projector of the version
 * before still inserts its batch's transfer rows, as one data-modifying CTE of its
 * write_rows: that goes through and changes nothing (the view has them from the log),
 * so it keeps projecting until it is replaced. No other role may insert. */
Test(roles, the_previous_projectors_transfer_rows_go_through_and_change_nothing)
{
	static const char old_insert[] =
		"WITH t AS (INSERT INTO rm_transfers (transfer_id, from_account, to_account, "
		"amount, currency, reference, at) SELECT unnest('{old-t}'::text[]), "
		"unnest('{x}'::text[]), unnest('{y}'::text[]), unnest('{5}'::bigint[]), "
		"unnest('{EUR}'::text[]), unnest('{NULL}'::text[]), unnest(ARRAY[now()])) SELECT 1";

	assert_allowed("daybook_projector", old_insert);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM rm_transfers"), 0);
	assert_log_untouched();
	assert_refused("daybook_query", old_insert, PERMISSION_DENIED);
	assert_refused("daybook_command", old_insert, PERMISSION_DENIED);
	assert_allowed("daybook_query", "SELECT * FROM rm_transfers");
}
