/* The projector's step machine: read a batch of the log, load what the fold needs, write
 * the SQL read models with the checkpoint, hand the batch to Redis, and follow the lease. */
#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "projector.h"

#define ACCOUNT_CACHE_MAX 50000 /* cached read-model rows, about 25 MB */

static void read_batch(struct projector_ctx *ctx);
static void load_checkpoint(struct projector_ctx *ctx);
static void use_ahead(struct projector_ctx *ctx);
static void read_ahead(struct projector_ctx *ctx);

static void free_event_data(struct log_event *e);

void projector_free_events(struct projector_ctx *ctx)
{
	for (size_t i = 0; i < ctx->nevents; i++)
		free_event_data(&ctx->events[i]);
	ctx->nevents = 0;
	projector_rows_free(&ctx->rows);
}

void projector_forget(struct projector_ctx *ctx)
{
	strmap_clear(ctx->accounts);
	strmap_clear(ctx->totals);
	ctx->totals_loaded = false;
}

/* Leave the step machine idle, or exit when asked to stop. */
static void go_idle(struct projector_ctx *ctx)
{
	projector_free_events(ctx);
	/* Between batches nothing points into the cache: bound its memory here. */
	if (strmap_count(ctx->accounts) > ACCOUNT_CACHE_MAX)
		strmap_clear(ctx->accounts);
	if (ctx->ahead_running) {
		ctx->step = STEP_AHEAD; /* the connection is busy: ahead_done comes back here */
		return;
	}
	ctx->step = STEP_IDLE;
	if (ctx->stopping) {
		log_info(&ctx->log, "batch finished; exiting");
		event_base_loopexit(ctx->base, NULL);
		return;
	}
	/* Leadership changed during the step; the caches could only be dropped now that
	 * the step's rows, which point into them, are gone. */
	if (ctx->role != ROLE_LEADER) {
		projector_forget(ctx); /* a standby writes nothing */
		return;
	}
	if (ctx->cp_stale) {
		projector_forget(ctx);
		load_checkpoint(ctx);
		return;
	}
	if (projector_redis_maintain(ctx))
		return; /* Redis first needs checking or copying; batches resume after */
	if (ctx->ahead_ready) {
		use_ahead(ctx);
	} else if (ctx->again) {
		ctx->again = false;
		read_batch(ctx);
	}
}

/* Something went wrong with the read models or the connection: start over from the
 * checkpoint in PostgreSQL with empty caches. */
static void recover(struct projector_ctx *ctx, const char *what)
{
	metric_add(ctx->m_errors, 1);
	log_warn(&ctx->log, "%s; reloading the checkpoint", what);
	projector_free_events(ctx);
	projector_drop_ahead(ctx);
	projector_forget(ctx);
	/* The retry timer resumes within a second: a persistent fault does not spin. */
	ctx->cp_stale = true;
	ctx->step = STEP_BLOCKED;
	if (ctx->stopping)
		event_base_loopexit(ctx->base, NULL);
}

static void write_failed_now(struct projector_ctx *ctx, enum write_failure what, const char *why);

void projector_redis_reported(struct projector_ctx *ctx, enum redis_report what)
{
	if (what != REDIS_STEP_DONE) {
		projector_wake(ctx);
		return;
	}
	if (ctx->redis_leg == REDIS_LEG_SENT) {
		/* The batch went to Redis with its SQL transaction: the step ends with the
		 * later of the two. */
		ctx->redis_leg = REDIS_LEG_OVER;
		if (ctx->step == STEP_WRITING)
			return; /* write_done ends it */
		if (ctx->write_held != WRITE_OK) {
			enum write_failure held = ctx->write_held;
			ctx->write_held = WRITE_OK;
			write_failed_now(ctx, held, ctx->write_why);
			return;
		}
	}
	go_idle(ctx);
}

void projector_wake(struct projector_ctx *ctx)
{
	if (ctx->role != ROLE_LEADER)
		return;
	if (ctx->step != STEP_IDLE || !pg_ready(ctx->pg)) {
		ctx->again = true;
		read_ahead(ctx);
		return;
	}
	if (ctx->cp_stale) {
		load_checkpoint(ctx);
		return;
	}
	read_batch(ctx);
}

static bool all_ok(PGresult *const *results, size_t n, char *why, size_t whylen)
{
	for (size_t i = 0; i < n; i++) {
		ExecStatusType st = PQresultStatus(results[i]);
		if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
			snprintf(why, whylen, "%s", PQresultErrorMessage(results[i]));
			why[strcspn(why, "\n")] = '\0';
			return false;
		}
	}
	return true;
}

/* --- write -------------------------------------------------------------------------- */

/* Did move_checkpoint fail with this named condition (a PROJECTOR_SQLSTATE_*)? */
static bool failed_with(PGresult *const *results, size_t n, const char *sqlstate)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(pg_sqlstate(results[i]), sqlstate) == 0)
			return true;
	return false;
}

static void step_down(struct projector_ctx *ctx, const char *why);

/* --- announcing the SQL checkpoint ----------------------------------------------------- */

/* The query service's reads waiting for a position are woken by NOTIFY daybook_position
 * '<txid>.<position>' once the SQL model holds it. It goes out after the batch has
 * committed, in a transaction of its own on a connection of its own, so that only it,
 * never a batch, waits for the notify lock. At most one is in flight; batches that
 * commit meanwhile are announced together by the next, with the newest checkpoint.
 * A lost one (the connection failed) costs only time: the query service's safety probe
 * and Redis's position messages stand in, as for any lost notification. The price is
 * one small transaction per batch (an xid, a commit record, the lock, the signals to
 * the listening backends): about 50 µs of PostgreSQL CPU, docs/performance.md. */
static const struct pg_statement notify_statements[] = {
	{ "notify_position", "SELECT pg_notify('" READMODEL_POSITION_CHANNEL "', $1)" },
	/* The oldest committed event after the checkpoint, below the horizon or not, and
	 * the log's head (lag beyond, below). */
	{ "look_beyond", "SELECT (extract(epoch FROM recorded_at) * 1000000)::bigint, "
			 "(SELECT coalesce(max(position), 0) FROM events) FROM events "
			 "WHERE (txid, position) > ($1::xid8, $2::bigint) "
			 "ORDER BY txid, position LIMIT 1" },
};

const struct pg_statement *projector_notify_statements(size_t *n)
{
	*n = sizeof(notify_statements) / sizeof(notify_statements[0]);
	return notify_statements;
}

static void notify_next(struct projector_ctx *ctx);

static void notify_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	char why[256];

	ctx->notify_running = false;
	if (!pg_outcome_ok(out, why, sizeof(why))) {
		log_debug(&ctx->log, "the position NOTIFY failed: %s", why);
		/* Lost with the connection: sent again once it is back (notify_next waits
		 * for it, on_connect calls it), unless a newer checkpoint goes out
		 * instead. One the server refused is not sent again (it would be refused
		 * again and again): the next batch's announcement covers it. */
		if (out->status == PG_RUN_NOT_SENT || out->status == PG_RUN_UNKNOWN) {
			if (!ctx->notify_token[0])
				memcpy(ctx->notify_token, ctx->notify_sent,
				       sizeof(ctx->notify_token));
		}
	}
	notify_next(ctx);
}

static void notify_next(struct projector_ctx *ctx)
{
	const char *token[1] = { ctx->notify_token };

	if (ctx->notify_running || ctx->beyond_running || !ctx->notify_token[0] ||
	    !pg_ready(ctx->notify_pg))
		return; /* notify_done, beyond_done or on_connect comes back here */
	if (!pg_queue(ctx->notify_pg, "notify_position", 1, token) ||
	    !pg_run(ctx->notify_pg, notify_done, ctx))
		return; /* being reset: on_connect sends it */
	ctx->notify_running = true;
	memcpy(ctx->notify_sent, ctx->notify_token, sizeof(ctx->notify_sent));
	ctx->notify_token[0] = '\0';
}

/* The batch up to the checkpoint committed: announce it. */
static void notify_checkpoint(struct projector_ctx *ctx)
{
	snprintf(ctx->notify_token, sizeof(ctx->notify_token), "%s.%lld", ctx->cp_txid,
		 ctx->cp_pos);
	notify_next(ctx);
}

void projector_on_notify_connect(void *arg)
{
	notify_next(arg);
}

/* --- the lag beyond the horizon --------------------------------------------------------
 *
 * read_events reads only below the cluster's xmin horizon, so one transaction that holds
 * an xid (a long migration step, an operator's open BEGIN; UPDATE, in any database of the
 * cluster) hides every event committed after it began: the reads come back empty while
 * the log grows, and the lag would read 0. So while the reads find nothing, the notify
 * connection looks past the horizon once a second: the age of the oldest committed
 * event after the checkpoint is the lag (and /readyz says so) until the reads see it.
 * The same while no read comes back at all (a step that lasts: a copy of SQL into
 * Redis holds the step machine, and with it the SQL model, for as long as it runs):
 * then the look's answer is the lag at once. */

#define LOOK_BEYOND_EVERY_S 1
#define READS_STALLED_S 2

static void set_lag(struct projector_ctx *ctx, long long head_pos, size_t got);

static bool reads_stalled(const struct projector_ctx *ctx, time_t now)
{
	return ctx->read_at && difftime(now, ctx->read_at) >= READS_STALLED_S;
}

static void beyond_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	char why[256];

	ctx->beyond_running = false;
	if (!pg_outcome_ok(out, why, sizeof(why)) || out->n != 1) {
		log_debug(&ctx->log, "looking past the horizon failed: %s", why);
		ctx->beyond_at_us = 0;
	} else {
		PGresult *r = out->results[0];
		bool found = PQntuples(r) == 1;
		ctx->beyond_at_us = found ? atoll(PQgetvalue(r, 0, 0)) : 0;
		ctx->beyond_head = found ? atoll(PQgetvalue(r, 0, 1)) : 0;
	}
	if (reads_stalled(ctx, time(NULL)))
		set_lag(ctx, 0, 0); /* no read will: the lag as the look found it */
	notify_next(ctx);
}

void projector_look_beyond(struct projector_ctx *ctx)
{
	char pos[24];
	const char *params[2] = { ctx->cp_txid, pos };
	time_t now = time(NULL);

	if (ctx->role != ROLE_LEADER || !(ctx->read_empty || reads_stalled(ctx, now)) ||
	    ctx->beyond_running || ctx->notify_running || ctx->notify_token[0] ||
	    !ctx->cp_txid[0] || difftime(now, ctx->beyond_sent) < LOOK_BEYOND_EVERY_S ||
	    !pg_ready(ctx->notify_pg))
		return;
	snprintf(pos, sizeof(pos), "%lld", ctx->cp_pos);
	if (!pg_queue(ctx->notify_pg, "look_beyond", 2, params) ||
	    !pg_run(ctx->notify_pg, beyond_done, ctx))
		return;
	ctx->beyond_running = true;
	ctx->beyond_sent = now;
	snprintf(ctx->beyond_cp, sizeof(ctx->beyond_cp), "%s.%lld", ctx->cp_txid, ctx->cp_pos);
}

static void write_failed_now(struct projector_ctx *ctx, enum write_failure what, const char *why)
{
	switch (what) {
	case WRITE_OK:
		return;
	case WRITE_FENCED:
		/* Our epoch is stale: a standby took the lease while we were frozen or cut
		 * off. The transaction rolled back; write nothing more. */
		projector_free_events(ctx);
		projector_forget(ctx);
		ctx->step = STEP_IDLE;
		if (ctx->role == ROLE_LEADER && ctx->epoch != ctx->write_epoch) {
			load_checkpoint(ctx); /* queued in an earlier term of ours */
			return;
		}
		lease_lost(ctx->lease);
		step_down(ctx, "the batch's epoch check failed (another projector took the "
			       "lease); nothing was committed");
		return;
	case WRITE_CP_MOVED:
		/* A rebuild swapped the tables (a new generation): nothing is wrong, so start
		 * again from its checkpoint now, not after the fault pause. */
		log_info(&ctx->log, "the SQL checkpoint moved under the batch (a rebuild's "
				    "switch); reloading it");
		ctx->cp_reloaded = true;
		projector_free_events(ctx);
		projector_forget(ctx);
		ctx->step = STEP_IDLE;
		load_checkpoint(ctx);
		return;
	case WRITE_FAILED:
		recover(ctx, why);
		return;
	}
}

/* The batch's transaction failed (rolled back, or its outcome unknown). When its Redis
 * leg is still in flight, the step waits for it (its reply, or a resend after a rebuild's
 * switch, uses the batch's rows) and handles the failure then: meanwhile nothing is read
 * ahead (cp_stale) and a new PostgreSQL session leaves the step alone (STEP_REDIS). What
 * Redis applied of the batch is a fold of committed events up to the batch's end, and
 * stays: the batch read again from the SQL checkpoint starts before the generation's
 * checkpoint, so PUT_BATCH writes it through the version guards, a no-op for what it
 * already holds (docs/read-models.md). */
static void write_failed(struct projector_ctx *ctx, enum write_failure what, const char *why)
{
	if (ctx->redis_leg != REDIS_LEG_SENT) {
		write_failed_now(ctx, what, why);
		return;
	}
	log_info(&ctx->log,
		 "the batch's SQL transaction failed (%s) while its Redis leg is "
		 "in flight: waiting for Redis's answer before starting over",
		 why);
	ctx->write_held = what;
	snprintf(ctx->write_why, sizeof(ctx->write_why), "%s", why);
	ctx->cp_stale = true;
	ctx->step = STEP_REDIS;
}

static void write_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	struct timespec now;
	char why[256];
	bool full = ctx->nevents == PROJECTOR_BATCH_MAX;

	clock_gettime(CLOCK_MONOTONIC, &now);
	metric_observe(ctx->m_commit_seconds,
		       (double)(now.tv_sec - ctx->write_start.tv_sec) +
			       (double)(now.tv_nsec - ctx->write_start.tv_nsec) / 1e9);
	if (error) {
		write_failed(ctx, WRITE_FAILED,
			     out->status == PG_RUN_COMMIT_FAILED
				     ? error
				     : "the connection failed while writing a batch");
		return;
	}
	if (!all_ok(results, n, why, sizeof(why))) {
		if (failed_with(results, n, PROJECTOR_SQLSTATE_FENCED))
			write_failed(ctx, WRITE_FENCED, why);
		else if (failed_with(results, n, PROJECTOR_SQLSTATE_CHECKPOINT_MOVED) &&
			 !ctx->cp_reloaded)
			write_failed(ctx, WRITE_CP_MOVED, why);
		else
			write_failed(ctx, WRITE_FAILED, why);
		return;
	}
	ctx->cp_reloaded = false;
	projector_rows_committed(ctx);
	snprintf(ctx->cp_txid, sizeof(ctx->cp_txid), "%s", ctx->events[ctx->nevents - 1].txid);
	ctx->cp_pos = ctx->batch_to_pos;
	metric_set(ctx->m_position, (double)ctx->cp_pos);
	notify_checkpoint(ctx);
	metric_add(ctx->m_applied, (double)ctx->nevents);
	metric_observe(ctx->m_batch, (double)ctx->nevents);
	log_debug(&ctx->log, "applied %zu events up to %s.%lld", ctx->nevents, ctx->cp_txid,
		  ctx->cp_pos);
	/* A full batch means more is waiting: keep going without waiting for a poll. */
	if (full)
		ctx->again = true;
	ctx->step = STEP_REDIS;
	if (ctx->redis_leg == REDIS_LEG_OVER) { /* sent with the transaction, and answered */
		go_idle(ctx);
		return;
	}
	if (ctx->redis_leg == REDIS_LEG_NONE && !projector_redis_batch(ctx))
		go_idle(ctx);
	else if (ctx->again)
		read_ahead(ctx);
}

static void fold_and_write(struct projector_ctx *ctx)
{
	const struct log_event *last;
	bool early;

	if (ctx->role != ROLE_LEADER) {
		go_idle(ctx);
		return;
	}
	if (!projector_fold(ctx)) {
		recover(ctx, "a batch could not be folded");
		return;
	}
	last = &ctx->events[ctx->nevents - 1];
	snprintf(ctx->batch_from, sizeof(ctx->batch_from), "%s.%lld", ctx->cp_txid, ctx->cp_pos);
	snprintf(ctx->batch_to, sizeof(ctx->batch_to), "%s.%lld", last->txid, last->position);
	ctx->batch_to_pos = last->position;
	ctx->redis_leg = REDIS_LEG_NONE;
	ctx->write_held = WRITE_OK;
	ctx->write_epoch = ctx->epoch;
	/* The Redis leg goes out with the transaction, not after its commit, so that the
	 * batch's visibility in Redis does not wait for the SQL commit, and the step lasts
	 * the longer of the two legs instead of their sum. Only while the lease is surely
	 * ours (lease_epoch ends a term not renewed in time, here and now): a successor
	 * claims it only after that, and each of its Redis writes raises the fence in the
	 * same script, so a batch of ours delayed past that (frozen before the socket
	 * write) lands before any write of the successor's, a whole fold of committed
	 * events that its guarded first batch takes as it is, or is refused. Otherwise
	 * (and while Redis is unknown, unsynced or its store's identity is to be read
	 * again) the batch goes after the commit, as before (docs/read-models.md). */
	early = !ctx->cp_stale && lease_epoch(ctx->lease) == ctx->epoch;
	if (ctx->role != ROLE_LEADER) { /* lease_epoch ended the term (step_down) */
		go_idle(ctx);
		return;
	}
	clock_gettime(CLOCK_MONOTONIC, &ctx->write_start);
	if (!projector_queue_writes(ctx) || !pg_run(ctx->pg, write_done, ctx)) {
		recover(ctx, "queueing the batch's writes failed");
		return;
	}
	ctx->step = STEP_WRITING;
	if (early)
		(void)projector_redis_batch_early(ctx);
}

/* --- load what the fold needs ------------------------------------------------------ */

static bool cache_account_row(struct projector_ctx *ctx, PGresult *r, int row)
{
	/* READMODEL_SQL_ACCOUNT_COLUMNS, then the entries count (9) */
	struct readmodel_account b = readmodel_account_from_pg(r, row, 0);
	struct rm_account *a = calloc(1, sizeof(*a));

	if (!a)
		return false;
	snprintf(a->row.acc.id, sizeof(a->row.acc.id), "%s", b.account_id);
	snprintf(a->row.name, sizeof(a->row.name), "%s", b.name);
	snprintf(a->row.acc.currency, sizeof(a->row.acc.currency), "%s", b.currency);
	a->row.acc.balance = b.balance;
	a->row.acc.overdraft_limit = b.overdraft_limit;
	a->row.acc.closed = strcmp(b.status, "closed") == 0;
	a->row.acc.version = b.version;
	a->row.entries = (int32_t)atoi(PQgetvalue(r, row, 9));
	snprintf(a->opened_at, sizeof(a->opened_at), "%s", b.opened_at);
	snprintf(a->updated_at, sizeof(a->updated_at), "%s", b.updated_at);
	if (!strmap_put(ctx->accounts, a->row.acc.id, a)) {
		free(a);
		return false;
	}
	return true;
}

static bool cache_totals(struct projector_ctx *ctx, PGresult *r)
{
	for (int row = 0; row < PQntuples(r); row++) {
		struct rm_total *t = calloc(1, sizeof(*t));
		const char *sum = PQgetvalue(r, row, 3);
		bool neg = *sum == '-';
		if (!t)
			return false;
		snprintf(t->tot.currency, sizeof(t->tot.currency), "%s", PQgetvalue(r, row, 0));
		t->tot.count.accounts = strtoll(PQgetvalue(r, row, 1), NULL, 10);
		t->tot.count.open_accounts = strtoll(PQgetvalue(r, row, 2), NULL, 10);
		for (const char *p = sum + neg; *p >= '0' && *p <= '9'; p++)
			t->tot.count.balance_sum = t->tot.count.balance_sum * 10 + (*p - '0');
		if (neg)
			t->tot.count.balance_sum = -t->tot.count.balance_sum;
		if (!strmap_put(ctx->totals, t->tot.currency, t)) {
			free(t);
			return false;
		}
	}
	ctx->totals_loaded = true;
	return true;
}

/* One lookup's rows into the caches: the totals (4 columns) or accounts; false when
 * out of memory. */
static bool cache_result(struct projector_ctx *ctx, PGresult *r)
{
	if (PQnfields(r) == 4)
		return cache_totals(ctx, r);
	for (int row = 0; row < PQntuples(r); row++)
		if (!cache_account_row(ctx, r, row))
			return false;
	return true;
}

static void load_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	char why[256];

	if (error) {
		recover(ctx, "the connection failed while loading read-model state");
		return;
	}
	if (!all_ok(results, n, why, sizeof(why))) {
		recover(ctx, why);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		if (!cache_result(ctx, results[i])) {
			recover(ctx, "out of memory caching read-model state");
			return;
		}
	}
	fold_and_write(ctx);
}

/* Queue the lookups of the batch's accounts that the cache lacks (*missing of them)
 * and of the totals until loaded; false when one could not be queued. */
static bool queue_lookups(struct projector_ctx *ctx, size_t *missing)
{
	struct evbuffer *ids = evbuffer_new();
	char *param = NULL;
	bool ok = false;

	*missing = 0;
	if (!ids)
		goto done;
	evbuffer_add(ids, "{", 1);
	for (size_t i = 0; i < ctx->nevents; i++) {
		struct log_event *e = &ctx->events[i];
		/* The fold takes the account found here rather than looking it up again. */
		if (e->type == LEDGER_ACCOUNT_OPENED)
			continue;
		if ((e->acct = strmap_get(ctx->accounts, e->account)))
			continue;
		pg_array_append(ids, e->account, (*missing)++ == 0);
	}
	if (*missing) {
		size_t len;
		evbuffer_add(ids, "}", 2);
		len = evbuffer_get_length(ids);
		param = malloc(len);
		if (!param)
			goto done;
		evbuffer_remove(ids, param, len);
		if (!pg_queue(ctx->pg, "load_accounts", 1, (const char *const *)&param))
			goto done;
	}
	ok = ctx->totals_loaded || pg_queue(ctx->pg, "load_totals", 0, NULL);
done:
	free(param);
	if (ids)
		evbuffer_free(ids);
	return ok;
}

/* Fetch the accounts of the batch that the cache lacks (and the totals once). */
static void load_missing(struct projector_ctx *ctx)
{
	size_t missing;

	if (!queue_lookups(ctx, &missing)) {
		recover(ctx, "queueing the state lookups failed");
		return;
	}
	if (missing || !ctx->totals_loaded) {
		if (!pg_run(ctx->pg, load_done, ctx)) {
			recover(ctx, "the connection failed");
			return;
		}
		ctx->step = STEP_LOADING;
		return;
	}
	fold_and_write(ctx);
}

/* --- read ------------------------------------------------------------------------------ */

/* Column col of the row into out (size n), cut as snprintf would. */
static void copy_text(char *out, size_t n, PGresult *r, int row, int col)
{
	size_t len = (size_t)PQgetlength(r, row, col);

	if (len >= n)
		len = n - 1;
	memcpy(out, PQgetvalue(r, row, col), len);
	out[len] = '\0';
}

/* A row of read_events (binary) into e; false when it cannot be decoded. The event's
 * data stays text until it is folded (fold.c reads it without jansson). */
static bool copy_event(struct log_event *e, PGresult *r, int row)
{
	/* jsonb's binary form: a version byte (1), then the text. */
	const char *data = PQgetvalue(r, row, 5);
	int dlen = PQgetlength(r, row, 5);
	size_t len = dlen > 0 ? (size_t)dlen - 1 : 0;

	e->data = NULL;
	if (PQgetlength(r, row, 0) != 8 || PQgetlength(r, row, 1) != 8 ||
	    PQgetlength(r, row, 3) != 4 || PQgetlength(r, row, 6) != 8 || dlen < 1 || data[0] != 1)
		return false;
	e->position = (long long)pg_bin_uint(PQgetvalue(r, row, 0), 8);
	snprintf(e->txid, sizeof(e->txid), "%llu",
		 (unsigned long long)pg_bin_uint(PQgetvalue(r, row, 1), 8));
	copy_text(e->account, sizeof(e->account), r, row, 2);
	e->version = (int32_t)pg_bin_uint(PQgetvalue(r, row, 3), 4);
	e->type = ledger_event_type_from_name(PQgetvalue(r, row, 4));
	e->data = len < sizeof(e->data_in) ? e->data_in : malloc(len + 1);
	if (e->data) {
		memcpy(e->data, data + 1, len);
		e->data[len] = '\0';
		e->data_len = len;
	}
	e->at_us = (int64_t)pg_bin_uint(PQgetvalue(r, row, 6), 8);
	readmodel_time_text(e->at_us, e->at);
	e->acct = NULL;
	return e->type && e->data;
}

static void free_event_data(struct log_event *e)
{
	if (e->data != e->data_in)
		free(e->data);
	e->data = NULL;
}

/* The Redis model trails the log by what SQL trails it plus what Redis trails SQL: in
 * events, from the positions; in seconds, the SQL lag plus how long Redis has trailed
 * the SQL checkpoint (both estimates, like the SQL ones). */
static void update_redis_lag(struct projector_ctx *ctx, long long head_pos)
{
	time_t now = time(NULL);
	double behind = 0;

	if (ctx->redis_pos >= ctx->cp_pos && ctx->rsync == RS_LIVE)
		ctx->redis_behind_since = 0;
	else if (!ctx->redis_behind_since)
		ctx->redis_behind_since = now;
	else
		behind = difftime(now, ctx->redis_behind_since);
	metric_set(ctx->m_redis_lag_events,
		   head_pos > ctx->redis_pos ? (double)(head_pos - ctx->redis_pos) : 0);
	metric_set(ctx->m_redis_lag_seconds,
		   (ctx->lag_seconds < 0 ? 0 : ctx->lag_seconds) + behind);
}

/* The log's head from read_events' rows; 0 without rows (then it is not needed). */
static long long head_of(PGresult *r)
{
	return PQntuples(r) && PQgetlength(r, 0, 7) == 8
		       ? (long long)pg_bin_uint(PQgetvalue(r, 0, 7), 8)
		       : 0;
}

static void update_lag(struct projector_ctx *ctx, long long head_pos, size_t got)
{
	ctx->read_empty = got == 0;
	ctx->read_at = time(NULL);
	set_lag(ctx, head_pos, got);
}

/* The lag metrics (and /readyz's lag) from a read of `got` events (head_pos: the log's
 * head then) or, with none, from the last look past the checkpoint. */
static void set_lag(struct projector_ctx *ctx, long long head_pos, size_t got)
{
	char cp[48];
	bool hidden;

	if (got == 0) {
		/* Caught up, unless the last look past the horizon, from this checkpoint,
		 * found an event the reads cannot see yet. */
		snprintf(cp, sizeof(cp), "%s.%lld", ctx->cp_txid, ctx->cp_pos);
		hidden = ctx->beyond_at_us > 0 && strcmp(cp, ctx->beyond_cp) == 0;
		head_pos = hidden ? ctx->beyond_head : 0;
		ctx->lag_seconds =
			hidden ? difftime(time(NULL), (time_t)(ctx->beyond_at_us / 1000000)) : 0;
	} else {
		/* recorded_at counts from 2000-01-01, 946,684,800 s after the Unix epoch. */
		ctx->lag_seconds = difftime(time(NULL),
					    (time_t)(ctx->events[0].at_us / 1000000 + 946684800));
	}
	/* Positions are not commit order, so this is an estimate; 0 once caught up. */
	metric_set(ctx->m_lag_events,
		   head_pos > ctx->cp_pos ? (double)(head_pos - ctx->cp_pos) : 0);
	metric_set(ctx->m_lag_seconds, ctx->lag_seconds < 0 ? 0 : ctx->lag_seconds);
	update_redis_lag(ctx, head_pos < ctx->cp_pos ? ctx->cp_pos : head_pos);
}

/* A batch is read (ctx->events; head_pos: the log's head then): go on with it. */
static void got_batch(struct projector_ctx *ctx, long long head_pos)
{
	update_lag(ctx, head_pos, ctx->nevents);
	if (ctx->nevents == 0) {
		go_idle(ctx);
		return;
	}
	load_missing(ctx);
}

static void read_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	char why[256];
	PGresult *r;

	if (error) {
		recover(ctx, "the connection failed while reading the log");
		return;
	}
	if (n != 1 || !all_ok(results, n, why, sizeof(why))) {
		recover(ctx, n == 1 ? why : "reading the log failed");
		return;
	}
	r = results[0];
	ctx->nevents = 0;
	for (int row = 0; row < PQntuples(r); row++) {
		if (!copy_event(&ctx->events[ctx->nevents++], r, row)) {
			recover(ctx, "an event in the log cannot be decoded");
			return;
		}
	}
	got_batch(ctx, head_of(r));
}

static void read_batch(struct projector_ctx *ctx)
{
	char pos[24];
	const char *params[2] = { ctx->cp_txid, pos };

	snprintf(pos, sizeof(pos), "%lld", ctx->cp_pos);
	if (!pg_queue_params(ctx->pg, "read_events", 2, params, NULL, NULL, true) ||
	    !pg_run(ctx->pg, read_done, ctx))
		return; /* the connection is being reset; on_connect starts over */
	ctx->step = STEP_READING;
}

/* --- read ahead ------------------------------------------------------------------------ */

/* While a batch's Redis leg is in flight the connection is free: the next batch is read
 * from the new checkpoint then (into ctx->ahead), so that the next step does not wait
 * for the Redis round trip before it can begin. It only reads; it is used only if the
 * checkpoint is still the one it was read from. */

void projector_drop_ahead(struct projector_ctx *ctx)
{
	for (size_t i = 0; i < ctx->nahead; i++)
		free_event_data(&ctx->ahead[i]);
	ctx->nahead = 0;
	ctx->ahead_ready = false;
}

/* The read-ahead's events and log head into ctx->ahead; false when it failed. */
static bool take_ahead(struct projector_ctx *ctx, const struct pg_outcome *out)
{
	char why[256];

	if (out->status != PG_RUN_DONE || out->n != 1 || !all_ok(out->results, 1, why, sizeof(why)))
		return false;
	for (int row = 0; row < PQntuples(out->results[0]); row++)
		if (!copy_event(&ctx->ahead[ctx->nahead++], out->results[0], row))
			return false;
	ctx->ahead_head = head_of(out->results[0]);
	return true;
}

static void ahead_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;

	ctx->ahead_running = false;
	if (take_ahead(ctx, out)) {
		ctx->ahead_ready = true;
		metric_add(ctx->m_read_ahead, 1);
	} else {
		projector_drop_ahead(ctx);
		ctx->again = true; /* the ordinary read finds out what is wrong */
	}
	if (ctx->step == STEP_AHEAD)
		go_idle(ctx);
}

static void read_ahead(struct projector_ctx *ctx)
{
	char pos[24];
	const char *params[2] = { ctx->cp_txid, pos };

	if (ctx->step != STEP_REDIS || ctx->ahead_running || ctx->ahead_ready || ctx->cp_stale ||
	    ctx->role != ROLE_LEADER || ctx->stopping || !pg_ready(ctx->pg))
		return;
	if (!ctx->ahead && !(ctx->ahead = calloc(PROJECTOR_BATCH_MAX, sizeof(*ctx->ahead))))
		return;
	snprintf(pos, sizeof(pos), "%lld", ctx->cp_pos);
	if (!pg_queue_params(ctx->pg, "read_events", 2, params, NULL, NULL, true) ||
	    !pg_run(ctx->pg, ahead_done, ctx))
		return; /* the connection is being reset */
	snprintf(ctx->ahead_from, sizeof(ctx->ahead_from), "%s.%lld", ctx->cp_txid, ctx->cp_pos);
	ctx->ahead_running = true;
	ctx->again = false; /* what woke us is in this read */
}

static void use_ahead(struct projector_ctx *ctx)
{
	char from[sizeof(ctx->ahead_from)];
	struct log_event *read = ctx->ahead;

	snprintf(from, sizeof(from), "%s.%lld", ctx->cp_txid, ctx->cp_pos);
	if (strcmp(from, ctx->ahead_from) != 0) { /* the checkpoint was reloaded: read again */
		projector_drop_ahead(ctx);
		read_batch(ctx);
		return;
	}
	ctx->ahead = ctx->events;
	ctx->events = read;
	ctx->nevents = ctx->nahead;
	ctx->nahead = 0;
	ctx->ahead_ready = false;
	ctx->step = STEP_READING;
	got_batch(ctx, ctx->ahead_head);
}

/* --- leadership ------------------------------------------------------------------------ */

static void checkpoint_done(void *arg, const struct pg_outcome *out)
{
	struct projector_ctx *ctx = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure (a commit-time one included). */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;

	ctx->step = STEP_IDLE;
	if (ctx->role != ROLE_LEADER)
		return;
	if (error || n != 1 || PQresultStatus(results[0]) != PGRES_TUPLES_OK ||
	    PQntuples(results[0]) != 1) {
		if (!error)
			log_error(&ctx->log, "cannot read the projection checkpoint: %s",
				  n ? PQresultErrorMessage(results[0]) : "no result");
		ctx->step = STEP_BLOCKED; /* retried by the retry timer */
		return;
	}
	snprintf(ctx->cp_txid, sizeof(ctx->cp_txid), "%s", PQgetvalue(results[0], 0, 0));
	ctx->cp_pos = strtoll(PQgetvalue(results[0], 0, 1), NULL, 10);
	snprintf(ctx->cp_gen, sizeof(ctx->cp_gen), "%s", PQgetvalue(results[0], 0, 2));
	metric_set(ctx->m_position, (double)ctx->cp_pos);
	log_info(&ctx->log, "resuming from checkpoint %s.%lld", ctx->cp_txid, ctx->cp_pos);
	read_batch(ctx);
}

/* Only between steps: nothing may point into the caches. */
static void load_checkpoint(struct projector_ctx *ctx)
{
	projector_forget(ctx);
	ctx->cp_stale = false;
	if (pg_queue(ctx->pg, "load_checkpoint", 0, NULL) && pg_run(ctx->pg, checkpoint_done, ctx))
		ctx->step = STEP_LOADING;
	else
		ctx->cp_stale = true; /* not connected: on_pg_connect loads it */
}

/* Stand by: write nothing until the lease names us again. */
static void step_down(struct projector_ctx *ctx, const char *why)
{
	if (ctx->role == ROLE_LEADER)
		log_warn(&ctx->log, "deposed: %s; standing by", why);
	else if (ctx->role == ROLE_ELECTING)
		log_info(&ctx->log, "%s; standing by", why);
	ctx->role = ROLE_STANDBY;
	ctx->again = false;
	ctx->cp_stale = true;
	metric_set(ctx->m_leader, 0);
	metric_set(ctx->m_epoch, 0);
	if (ctx->step == STEP_IDLE || ctx->step == STEP_BLOCKED) {
		ctx->step = STEP_IDLE;
		projector_forget(ctx);
	}
	/* A step in flight finishes on its own: its writes carry the term's epoch (kept in
	 * ctx->epoch), which PostgreSQL and Redis refuse once a successor has taken the
	 * lease; none is started after this. */
}

void projector_on_lease_change(void *arg, long long epoch, const char *why)
{
	struct projector_ctx *ctx = arg;

	if (epoch == 0) {
		step_down(ctx, why);
		return;
	}
	log_info(&ctx->log, "leading the projection (epoch %lld)", epoch);
	ctx->role = ROLE_LEADER;
	ctx->epoch = epoch;
	metric_set(ctx->m_leader, 1);
	metric_set(ctx->m_epoch, (double)epoch);
	/* The last leader may have died mid-sweep, and generation numbers start again
	 * after a FLUSHALL: sweep the whole key space once, not only the generation after
	 * the one this process last swept for (redis_sync.c). */
	ctx->swept_gen = 0;
	projector_redis_fence(ctx);
	/* Whatever we knew of the read models is stale: reload the checkpoint, with empty
	 * caches, now if idle, else once the step in flight (which points into the caches)
	 * is over, or on connecting. */
	ctx->cp_stale = true;
	if ((ctx->step == STEP_IDLE || ctx->step == STEP_BLOCKED) && pg_ready(ctx->pg)) {
		ctx->step = STEP_IDLE;
		projector_forget(ctx);
		load_checkpoint(ctx);
	}
}

void projector_retry(struct projector_ctx *ctx)
{
	if (ctx->step == STEP_BLOCKED)
		ctx->step = STEP_IDLE;
	if (ctx->role == ROLE_LEADER && ctx->step == STEP_IDLE && ctx->cp_stale &&
	    pg_ready(ctx->pg))
		load_checkpoint(ctx);
}

void projector_on_pg_connect(void *arg)
{
	struct projector_ctx *ctx = arg;

	/* Leadership is the lease's, not this session's: a leader resumes from the
	 * checkpoint with empty caches. The database may be another one now: its identity
	 * is read again before Redis is written. */
	projector_redis_session(ctx);
	/* A step still in flight now waits for Redis (a run on the lost connection has
	 * already failed): its replies end it, and go_idle then reloads the checkpoint.
	 * Resetting it here would let those replies end (and free) another step. */
	if (ctx->step == STEP_REDIS || ctx->step == STEP_SYNCING) {
		ctx->cp_stale = true;
		return;
	}
	ctx->step = STEP_IDLE;
	projector_free_events(ctx);
	projector_forget(ctx);
	if (ctx->role == ROLE_LEADER)
		load_checkpoint(ctx);
}
