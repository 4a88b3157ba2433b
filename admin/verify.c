/* daybook-admin verify: fold the event log independently with the pure domain and
 * compare the result, field by field, with the SQL read models and Redis's live
 * generation. Memory stays bounded: sorted server-side cursors are merge-joined, and
 * only one account's state is held at a time.
 *
 * The fold is independent ON PURPOSE (verify_compare.c): it checks the one fold that
 * the projector, rebuild and time travel share (readmodel_fold), so it does not call
 * it, and shares only the Redis key names, the body renderers and the constants of
 * shared/readmodel.h. */
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "cli.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "verify.h"

static bool read_checkpoint(struct verify *v)
{
	PGresult *r = PQexec(v->pg, "SELECT txid::text, position FROM projection_checkpoints "
				    "WHERE projection = 'sql'");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	if (ok) {
		snprintf(v->cp_txid, sizeof(v->cp_txid), "%s", PQgetvalue(r, 0, 0));
		snprintf(v->cp_pos, sizeof(v->cp_pos), "%s", PQgetvalue(r, 0, 1));
		snprintf(v->cp_token, sizeof(v->cp_token), "%s.%s", v->cp_txid, v->cp_pos);
		ok = readmodel_position_parse(v->cp_token, &v->cp);
	}
	if (!ok)
		verify_fail(v, "reading the sql checkpoint: %s",
			    PQresultStatus(r) == PGRES_TUPLES_OK
				    ? "no row 'sql' in projection_checkpoints\n"
				    : PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

static double seconds_since(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

static void summary(const struct verify *v, bool redis, const struct timespec *start)
{
	printf("verify: %llu events folded up to %s: %llu accounts, %llu entries, %llu transfers, "
	       "%zu currencies",
	       v->events, v->cp_token, v->accounts, v->entries, v->transfers, v->ntotals);
	if (v->gen[0])
		printf("; redis generation %s: %llu newer than the snapshot", v->gen, v->newer);
	else if (v->foreign[0])
		printf("; redis generation %s is another event store's", v->foreign);
	else
		printf("; redis %s", redis ? "has no live generation" : "not checked");
	printf("; %llu difference%s", v->diffs, v->diffs == 1 ? "" : "s");
	if (v->diffs > DIFFS_PRINTED)
		printf(" (first %d printed)", DIFFS_PRINTED);
	printf(" in %.2f s\n", seconds_since(start));
}

static int run(struct verify *v)
{
	bool redis = v->redis != NULL;
	struct timespec start;

	clock_gettime(CLOCK_MONOTONIC, &start);
	if (!verify_exec(v, "SET application_name = 'daybook-admin verify'") ||
	    !verify_exec(v, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") ||
	    !read_checkpoint(v))
		return 2;
	if (v->redis)
		verify_redis_prepare(v);
	verify_pass_accounts(v);
	if (!v->failed)
		verify_check_totals(v);
	if (!v->failed)
		verify_pass_transfers(v);
	if (!v->failed && v->redis)
		verify_redis_recheck_live(v);
	if (!v->failed)
		verify_exec(v, "COMMIT");
	if (!v->failed && v->redis && v->gen[0])
		verify_pass_redis_orphans(v);
	fflush(stdout);
	if (v->failed)
		return CLI_EXIT_UNAVAILABLE; /* a query or Redis failed: no verdict */
	summary(v, redis, &start);
	return v->diffs ? 1 : 0;
}

static bool connect_all(struct admin_ctx *ctx, struct verify *v, bool use_redis)
{
	char err[256];

	v->pg = PQconnectdb(ctx->cfg.pg);
	if (PQstatus(v->pg) != CONNECTION_OK) {
		char line[1024];
		log_error(v->log, "cannot connect to PostgreSQL: %s",
			  log_oneline(PQerrorMessage(v->pg), line, sizeof(line)));
		return false;
	}
	if (!use_redis) {
		log_warn(v->log, "%s: Redis is not checked",
			 ctx->cfg.redis_url ? "--no-redis" : "DAYBOOK_REDIS is not set");
		return true;
	}
	v->redis = admin_redis_connect(&ctx->cfg.redis, err, sizeof(err));
	if (!v->redis) {
		char where[600];
		config_redis_describe(&ctx->cfg.redis, where, sizeof(where));
		log_error(v->log, "cannot connect to Redis at %s: %s", where, err);
	}
	return v->redis != NULL;
}

int admin_verify(struct admin_ctx *ctx, int argc, char **argv)
{
	static const struct option options[] = {
		{ "no-redis", no_argument, NULL, 'R' },
		CLI_COMMON_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	struct verify *v = calloc(1, sizeof(*v));
	bool use_redis, no_redis = false;
	int rc = CLI_EXIT_USAGE, c;

	while ((c = getopt_long(argc, argv, "+:h", options, NULL)) != -1) {
		switch (c) {
		case 'R':
			no_redis = true;
			break;
		case 'h':
			rc = admin_help("verify");
			goto done;
		default:
			rc = admin_getopt_error("verify", argc, argv, c);
			goto done;
		}
	}
	if (optind < argc) {
		rc = admin_usage_error("verify", "unexpected argument '%s'", argv[optind]);
		goto done;
	}
	if (!admin_configure(ctx, "verify"))
		goto done;
	use_redis = ctx->cfg.redis_url != NULL && !no_redis;
	rc = CLI_EXIT_UNAVAILABLE;
	if (!v) {
		log_error(&ctx->log, "out of memory");
		goto done;
	}
	v->log = &ctx->log;
	v->conninfo = ctx->cfg.pg;
	if (!connect_all(ctx, v, use_redis))
		goto done;
	if (!admin_event_store_usable(v->pg, v->log)) {
		rc = EVENTSTORE_EXIT_UNUSABLE;
		goto done;
	}
	rc = run(v);
done:
	if (v) {
		for (size_t i = 0; i < v->npending; i++)
			pending_free(&v->pending[i]);
		if (v->redis)
			redisFree(v->redis);
		PQfinish(v->pg);
		PQfinish(v->now);
		free(v->totals);
	}
	free(v);
	return rc;
}
