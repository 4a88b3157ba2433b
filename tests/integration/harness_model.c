/* Integration-test harness: read-model checks: positions, catching up, and the SQL and
 * Redis models against an independent fold of the log. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "readmodel.h"

static const char head_sql[] = "SELECT coalesce((SELECT txid::text || '.' || position FROM events "
			       "ORDER BY txid DESC, position DESC LIMIT 1), '0.0')";

void harness_sql_checkpoint(const char *db, char *out, size_t len)
{
	PGresult *r = sql(db, "SELECT txid::text || '.' || position FROM projection_checkpoints "
			      "WHERE projection = 'sql'");
	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

void harness_log_head(const char *db, char *out, size_t len)
{
	PGresult *r = sql(db, head_sql);
	snprintf(out, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

bool harness_redis_live(struct redisContext *c, long long *gen, char *cp, size_t len)
{
	redisReply *g = redisCommand(c, "GET " READMODEL_LIVE_KEY), *p;
	bool ok = g && g->type == REDIS_REPLY_STRING;

	if (ok) {
		*gen = atoll(g->str);
		p = redisCommand(c, "GET dbk:g:%lld:checkpoint", *gen);
		ok = p && p->type == REDIS_REPLY_STRING;
		if (ok)
			snprintf(cp, len, "%s", p->str);
		freeReplyObject(p);
	}
	freeReplyObject(g);
	return ok;
}

static bool sql_caught_up(void *arg)
{
	const char *db = arg;
	char head[64], cp[64];

	harness_log_head(db, head, sizeof(head));
	harness_sql_checkpoint(db, cp, sizeof(cp));
	return strcmp(head, cp) == 0;
}

bool harness_wait_sql_caught_up(const char *db, double deadline)
{
	return harness_wait_until(sql_caught_up, (void *)db, deadline);
}

void harness_wait_caught_up(const char *db, const char *redis_url, double timeout)
{
	char head[64], cp[64], rcp[64] = "";
	long long gen;
	redisContext *c = harness_redis(redis_url);
	double end = harness_now() + timeout;

	for (;;) {
		harness_log_head(db, head, sizeof(head));
		harness_sql_checkpoint(db, cp, sizeof(cp));
		bool live = harness_redis_live(c, &gen, rcp, sizeof(rcp));
		if (strcmp(head, cp) == 0 && live && strcmp(rcp, cp) == 0)
			break;
		/* SQL behind: often another test's long transaction holding back the horizon
		 * below which the projector reads. */
		if (harness_now() >= end && strcmp(head, cp) != 0)
			harness_print_xid_holders();
		cr_assert(harness_now() < end, "not caught up: log %s, sql %s, redis %s", head, cp,
			  live ? rcp : "(none)");
		usleep(20000);
	}
	redisFree(c);
}

void harness_assert_models_match_log(const char *db)
{
	static const char delta[] =
		"CASE type WHEN 'FundsDeposited' THEN (data->>'amount')::bigint "
		"WHEN 'TransferReceived' THEN (data->>'amount')::bigint "
		"WHEN 'FundsWithdrawn' THEN -(data->>'amount')::bigint "
		"WHEN 'TransferSent' THEN -(data->>'amount')::bigint ELSE 0 END";
	static const char money[] =
		"type IN ('FundsDeposited', 'FundsWithdrawn', 'TransferSent', 'TransferReceived')";
	char q[2048];

	snprintf(q, sizeof(q),
		 "WITH acc AS (SELECT substr(stream, 9) id, max(version) v, sum(%s) bal, "
		 "count(*) FILTER (WHERE %s) n, bool_or(type = 'AccountClosed') closed FROM events "
		 "GROUP BY stream) SELECT count(*) FROM acc FULL JOIN rm_accounts r ON r.account_id = "
		 "acc.id WHERE r.account_id IS NULL OR acc.id IS NULL OR r.balance <> acc.bal OR "
		 "r.version <> acc.v OR r.entries <> acc.n OR (r.status = 'closed') <> acc.closed",
		 delta, money);
	cr_assert_eq(sql_int(db, q), 0, "rm_accounts differs from the log");
	snprintf(q, sizeof(q),
		 "WITH m AS (SELECT substr(stream, 9) id, version, sum(%s) OVER (PARTITION BY stream "
		 "ORDER BY version) bal FROM events WHERE %s) SELECT count(*) FROM m FULL JOIN "
		 "rm_entries e ON e.account_id = m.id AND e.version = m.version WHERE e.account_id IS "
		 "NULL OR m.id IS NULL OR e.balance_after <> m.bal",
		 delta, money);
	cr_assert_eq(sql_int(db, q), 0, "rm_entries differs from the log");
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM events e FULL JOIN rm_transfers t ON "
			     "t.transfer_id = e.data->>'transfer_id' WHERE (e.type = 'TransferSent' "
			     "OR e.type IS NULL) AND (t.transfer_id IS NULL OR e.position IS NULL OR "
			     "t.amount <> (e.data->>'amount')::bigint)"),
		     0, "rm_transfers differs from the log");
	cr_assert_eq(sql_int(db,
			     "SELECT count(*) FROM (SELECT currency, count(*) a, count(*) FILTER "
			     "(WHERE status = 'open') o, sum(balance) s FROM rm_accounts GROUP BY "
			     "currency) x FULL JOIN rm_totals t USING (currency) WHERE t.accounts IS "
			     "DISTINCT FROM x.a OR t.open_accounts IS DISTINCT FROM x.o OR "
			     "t.balance_sum IS DISTINCT FROM x.s"),
		     0, "rm_totals differs from the accounts");
}

void harness_assert_redis_matches_sql(const char *db, const char *redis_url)
{
	redisContext *c = harness_redis(redis_url);
	PGresult *r =
		sql(db,
		    "SELECT account_id, name, currency, balance, overdraft_limit, status, "
		    "version, entries, "
		    "to_char(opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
		    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
		    "FROM rm_accounts");
	char cp[64];
	long long gen;

	cr_assert(harness_redis_live(c, &gen, cp, sizeof(cp)));
	for (int i = 0; i < PQntuples(r); i++) {
		struct readmodel_account a = {
			.account_id = PQgetvalue(r, i, 0),
			.name = PQgetvalue(r, i, 1),
			.currency = PQgetvalue(r, i, 2),
			.balance = atoll(PQgetvalue(r, i, 3)),
			.overdraft_limit = atoll(PQgetvalue(r, i, 4)),
			.status = PQgetvalue(r, i, 5),
			.version = atoi(PQgetvalue(r, i, 6)),
			.opened_at = PQgetvalue(r, i, 8),
			.updated_at = PQgetvalue(r, i, 9),
		};
		char *want = readmodel_account_json(&a);
		redisReply *j = redisCommand(c, "HGET dbk:g:%lld:acct:%s j", gen, a.account_id);
		redisReply *n = redisCommand(c, "LLEN dbk:g:%lld:stmt:%s", gen, a.account_id);
		long long entries = atoll(PQgetvalue(r, i, 7));

		cr_assert(j && j->type == REDIS_REPLY_STRING, "account %s missing in redis",
			  a.account_id);
		cr_assert_str_eq(j->str, want);
		cr_assert_eq(n->integer, entries < 50 ? entries : 50, "statement of %s",
			     a.account_id);
		free(want);
		freeReplyObject(j);
		freeReplyObject(n);
	}
	PQclear(r);
	redisFree(c);
}
