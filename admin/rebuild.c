/* daybook-admin rebuild [redis|sql|all]: fold the whole log into shadow read models
 * (SQL shadow tables, a new Redis generation) while the services keep running, catch
 * up, then switch atomically under the projection switch lock. */
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "cli.h"
#include "copy.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "rebuild.h"
#include "strmap.h"

static void on_signal(int sig)
{
	(void)sig;
	rb_interrupted = 1;
}

/* The writer's connection, made in a thread while the main thread makes the reader's:
 * a connection costs a few round trips and the password exchange's hashing. */
static void *connect_writer(void *arg)
{
	struct rebuild *rb = arg;

	rb->wr = PQconnectdb(rb->ctx->cfg.pg);
	return NULL;
}

static void connect_both(struct rebuild *rb)
{
	pthread_t t;
	int err = copy_spawn(&t, connect_writer, rb);

	rb->pg = PQconnectdb(rb->ctx->cfg.pg);
	if (err)
		connect_writer(rb);
	else
		pthread_join(t, NULL);
}

/* One rebuild of a database at a time: two would share the shadow tables (each
 * resetting and dropping the other's, one swapping in a mix of both) and delete each
 * other's Redis generations. The lock is the session's: it goes with the process. */
static bool take_rebuild_lock(struct rebuild *rb)
{
	PGresult *r = PQexec(rb->wr, "SELECT pg_try_advisory_lock(" REBUILD_LOCK ")");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	rb->locked = ok && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
	if (!ok)
		rb_error(rb, "taking the rebuild lock: %s", PQresultErrorMessage(r));
	else if (!rb->locked)
		rb_error(rb, "another daybook-admin rebuild of this database is running: nothing "
			     "was done (run this one once it has ended)\n");
	PQclear(r);
	return rb->locked;
}

static bool prepare(struct rebuild *rb)
{
	connect_both(rb);
	if (PQstatus(rb->pg) != CONNECTION_OK || PQstatus(rb->wr) != CONNECTION_OK) {
		rb->failure = CLI_EXIT_UNAVAILABLE;
		rb_error(rb, "cannot connect to PostgreSQL: %s",
			 PQerrorMessage(PQstatus(rb->pg) != CONNECTION_OK ? rb->pg : rb->wr));
		return false;
	}
	if (!admin_event_store_usable(rb->pg, &rb->ctx->log)) {
		rb->failure = EVENTSTORE_EXIT_UNUSABLE;
		return false;
	}
	if (strmap_open(&rb->accounts, rb_acct_free) || strmap_open(&rb->totals, free))
		return false;
	/* Both sessions write shadow tables and build keys: the swap commits durably, keys
	 * sort in memory. One round trip each. */
	for (int i = 0; i < 2; i++)
		if (!rb_exec(rb, i ? rb->wr : rb->pg,
			     "SET client_min_messages = warning; SET synchronous_commit = off; "
			     "SET maintenance_work_mem = '256MB'"))
			return false;
	rb_choose_count(rb);
	if (!rb_send_count(rb))
		return false;
	/* An autovacuum of a live table gives way to a lock request only after
	 * deadlock_timeout; the switch's attempts wait less than the default 1 s, so it is
	 * shortened (a superuser setting: without it, the switch waits for autovacuum). */
	PQclear(PQexec(rb->wr, "SET deadlock_timeout = '100ms'"));
	if (!take_rebuild_lock(rb))
		return false;
	if (rb->sql && !rb_exec(rb, rb->wr, "SELECT rm_shadow_reset()"))
		return false;
	if ((rb->want_redis && !rb_connect_redis(rb)) || !rb_take_count(rb) || !rb_bulk_bounds(rb))
		return false;
	return true;
}

static void abandon(struct rebuild *rb)
{
	/* Without the rebuild lock nothing is ours to undo (the shadow tables may be
	 * another rebuild's). */
	if (rb->locked && rb->sql && rb->wr && PQstatus(rb->wr) == CONNECTION_OK)
		rb_exec(rb, rb->wr, "SELECT rm_shadow_drop()");
	if (rb->locked && rb->redis && rb->gen && rb_redis_usable(rb))
		rb_redis_cleanup(rb, 0, rb->gen);
	if (rb->tty) {
		log_error(&rb->ctx->log, "%s; %s", rb_interrupted ? "interrupted" : "failed",
			  rb->live_touched ? "the live redis pointer was changed (said above)"
					   : "the live read models are untouched");
		return;
	}
	rb_json_line(json_pack("{s:s, s:I, s:I, s:o, s:b}", "phase",
			       rb_interrupted ? "interrupted" : "failed", "done",
			       (json_int_t)rb->done, "total", (json_int_t)rb->total, "error",
			       log_text(rb->error[0]     ? rb->error
					: rb_interrupted ? "interrupted"
							 : "failed"),
			       "live_untouched", !rb->live_touched));
}

static void finish(struct rebuild *rb)
{
	free(rb->entries.p);
	free(rb->copier.entries.p);
	ledger_event_buf_free(&rb->data);
	free(rb->xfer_ids.p);
	free(rb->holders);
	strmap_close(&rb->accounts);
	strmap_close(&rb->totals);
	if (rb->redis)
		redisFree(rb->redis);
	PQfinish(rb->pg);
	PQfinish(rb->wr);
}

/* The arguments: CLI_EXIT_OK to go on, else the exit status (--help: CLI_EXIT_OK with
 * *done set). */
static int parse_target(int argc, char **argv, struct rebuild *rb, bool *done)
{
	static const struct option options[] = { CLI_COMMON_OPTIONS, { NULL, 0, NULL, 0 } };
	const char *t;
	int c;

	while ((c = getopt_long(argc, argv, "+:h", options, NULL)) != -1) {
		if (c == 'h') {
			*done = true;
			return admin_help("rebuild");
		}
		return admin_getopt_error("rebuild", argc, argv, c);
	}
	t = optind < argc ? argv[optind] : "all";
	if (optind + 1 < argc)
		return admin_usage_error("rebuild", "unexpected argument '%s'", argv[optind + 1]);
	if (strcmp(t, "all") && strcmp(t, "sql") && strcmp(t, "redis"))
		return admin_usage_error("rebuild", "unknown target '%s': redis, sql or all", t);
	if (!admin_configure(rb->ctx, "rebuild"))
		return CLI_EXIT_USAGE;
	rb->sql = strcmp(t, "redis") != 0;
	rb->want_redis = strcmp(t, "sql") != 0;
	rb->hinted = rb->sql && rb->want_redis;
	const char *held = getenv("DAYBOOK_REBUILD_HELD_MAX");
	char *end = NULL;
	rb->held_max = held && *held ? strtoll(held, &end, 10) : HELD_MAX;
	if ((end && *end) || rb->held_max < 1 || rb->held_max > 100000000) {
		log_error(&rb->ctx->log, "DAYBOOK_REBUILD_HELD_MAX must be a number from 1 to "
					 "100000000");
		return CLI_EXIT_USAGE;
	}
	return 0;
}

int admin_rebuild(struct admin_ctx *ctx, int argc, char **argv)
{
	struct rebuild rb = { .ctx = ctx, .phase = "load", .failure = CLI_EXIT_PROBLEM };
	struct sigaction sa = { .sa_handler = on_signal };
	char checkpoint[64];
	const char *what, *cleanup_by;
	bool done = false;
	double secs;
	int rc = parse_target(argc, argv, &rb, &done);

	if (rc != CLI_EXIT_OK || done)
		return rc;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	rb.tty = isatty(STDERR_FILENO);
	rb.started = rb_now();
	if (!prepare(&rb) || !rb_load(&rb))
		goto fail;
	rb.loaded = rb_now();
	if (!rb_index_and_send(&rb))
		goto fail;
	rb.indexed = rb_now();
	if (rb_interrupted || !rb_switch_over(&rb))
		goto fail;
	rb.switched = rb_now();
	rb_report(&rb, true);
	/* The old Redis generation: deleted here unless a leading projector sweeps it. */
	cleanup_by = !rb.redis ? "none" : rb_cleanup_after_switch(&rb) ? "rebuild" : "projector";
	secs = rb_now() - rb.started;
	what = rb.sql && rb.redis ? "sql and redis" : rb.sql ? "sql" : "redis";
	snprintf(checkpoint, sizeof(checkpoint), "%llu.%lld", (unsigned long long)rb.cp_txid,
		 rb.position);
	if (rb.tty)
		printf("rebuilt %s from %lld events in %.2f s (%.0f events/s; load %.2f s, index "
		       "%.2f s, switch %.2f s, cleanup %.2f s%s); checkpoint %s\n",
		       what, rb.done, secs, rb.done / (secs + 1e-9), rb.loaded - rb.started,
		       rb.indexed - rb.loaded, rb.switched - rb.indexed, rb_now() - rb.switched,
		       strcmp(cleanup_by, "projector") == 0 ? ", the old generation left to the "
							      "projector's sweep"
							    : "",
		       checkpoint);
	else
		rb_json_line(
			json_pack("{s:s, s:I, s:I, s:f, s:f, s:s, s:f, s:f, s:f, s:f, s:f, s:s, s:s}",
				  "phase", "done", "done", (json_int_t)rb.done, "total",
				  (json_int_t)rb.total, "events_per_s", rb.done / (secs + 1e-9),
				  "eta_s", 0.0, "rebuilt", what, "seconds", secs, "load_s",
				  rb.loaded - rb.started, "index_s", rb.indexed - rb.loaded,
				  "switch_s", rb.switched - rb.indexed, "cleanup_s",
				  rb_now() - rb.switched, "cleanup_by", cleanup_by, "checkpoint",
				  checkpoint));
	finish(&rb);
	return CLI_EXIT_OK;
fail:
	rb_report(&rb, true);
	abandon(&rb);
	finish(&rb);
	return rb_interrupted ? 130 : rb.failure;
}
