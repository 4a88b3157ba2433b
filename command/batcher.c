/* The group-commit batcher's queue and its state machine: commands wait, a batch is
 * taken, loaded (load.c), decided (decide.c), written (append.c), and each command's
 * outcome is reported through the hooks (cmd_settle answers it). A failure's meaning
 * for the batch's commands is decided here too. See batch.h for the whole story. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batch.h"

static void start_batch(struct batcher *b);
static void decide_or_refold(struct batcher *b);
static void load_done(void *arg, const struct pg_outcome *out);

int batcher_open(struct batcher **out, struct command_ctx *ctx, const struct batcher_hooks *hooks)
{
	struct batcher *b = calloc(1, sizeof(*b));
	struct metrics *m = ctx->metrics;

	*out = NULL;
	if (!b || strmap_open(&b->cache, free) || strmap_open(&b->inflight, NULL) ||
	    strmap_open(&b->overlay, NULL) || strmap_open(&b->transfers, NULL) ||
	    strmap_open(&b->refold, NULL) || strmap_open(&b->catchup, free)) {
		batcher_close(&b);
		return -1;
	}
	b->ctx = ctx;
	b->hooks = *hooks;
	b->batch_size = metrics_get(m, METRIC_HISTOGRAM, "daybook_append_batch_size",
				    "Commands per group-commit transaction.", "",
				    metrics_size_buckets, metrics_size_buckets_len);
	b->events_total = metrics_get(m, METRIC_COUNTER, "daybook_events_appended_total",
				      "Events committed to the event store.", "", NULL, 0);
	b->replays = metrics_get(m, METRIC_COUNTER, "daybook_idempotent_replays_total",
				 "Requests answered from a stored idempotency record.", "", NULL,
				 0);
	b->conflicts = metrics_get(m, METRIC_COUNTER, "daybook_append_conflicts_total",
				   "Batches rolled back by a conflict and retried one by one.", "",
				   NULL, 0);
	b->unavailable = metrics_get(m, METRIC_COUNTER, "daybook_append_unavailable_total",
				     "Commands refused because PostgreSQL was unreachable.", "",
				     NULL, 0);
	b->fenced =
		metrics_get(m, METRIC_COUNTER, "daybook_append_fenced_total",
			    "Batches rolled back because another instance took the write lease.",
			    "", NULL, 0);
	b->not_leader = metrics_get(m, METRIC_COUNTER, "daybook_append_not_leader_total",
				    "Commands refused because this instance does not lead.", "",
				    NULL, 0);
	b->commit_seconds =
		metrics_get(m, METRIC_HISTOGRAM, "daybook_append_commit_seconds",
			    "Time from sending a batch's write transaction to PostgreSQL's "
			    "verdict on its COMMIT, whatever the verdict.",
			    "", metrics_latency_buckets, metrics_latency_buckets_len);
	b->batch_events = metrics_get(m, METRIC_HISTOGRAM, "daybook_append_batch_events",
				      "Events per write transaction.", "", metrics_size_buckets,
				      metrics_size_buckets_len);
	b->barriers =
		metrics_get(m, METRIC_COUNTER, "daybook_append_barriers_total",
			    "Transactions committed for batches that wrote nothing (replays, "
			    "refusals), so that each answer waits for the synchronous standby as "
			    "a write's would.",
			    "", NULL, 0);
	*out = b;
	return 0;
}

void batcher_close(struct batcher **bp)
{
	struct batcher *b = *bp;

	if (!b)
		return;
	for (struct cmd *c = b->head, *next; c; c = next) {
		next = c->next;
		b->hooks.drop(b->hooks.arg, c);
	}
	strmap_close(&b->cache);
	strmap_close(&b->inflight);
	strmap_close(&b->overlay);
	strmap_close(&b->transfers);
	strmap_close(&b->refold);
	strmap_close(&b->catchup);
	ledger_text_free(&b->text);
	free(b);
	*bp = NULL;
}

/* Report a command's outcome and forget it; steals body and headers. */
static void answer(struct batcher *b, struct cmd *cmd, int status, json_t *body, json_t *headers,
		   bool replay)
{
	struct cmd_outcome out = {
		.status = status, .body = body, .headers = headers, .replay = replay
	};

	idem_release(b, cmd);
	b->hooks.settle(b->hooks.arg, cmd, &out);
}

static void answer_problem(struct batcher *b, struct cmd *cmd, int status, const char *code,
			   const char *title, const char *detail)
{
	answer(b, cmd, status, http_problem_json(status, code, title, detail), NULL, false);
}

static void answer_unavailable(struct batcher *b, struct cmd *cmd, const char *why)
{
	metric_add(b->unavailable, 1);
	answer_problem(b, cmd, 503, "unavailable", "Service unavailable", why);
}

static void answer_not_leader(struct batcher *b, struct cmd *cmd)
{
	metric_add(b->not_leader, 1);
	answer_problem(b, cmd, 503, "not_leader", "Not the leader",
		       "this instance stands by for another that leads; nothing was written, "
		       "retry shortly");
}

void batcher_submit(struct batcher *b, struct cmd *cmd)
{
	bool busy;

	if (b->ctx->stopping || !pg_connected(b->ctx->pg)) {
		answer_unavailable(b, cmd, "the event store is unreachable; retry shortly");
		return;
	}
	if (!lease_epoch(b->ctx->lease)) {
		answer_not_leader(b, cmd);
		return;
	}
	if (b->npending >= PENDING_MAX) {
		answer_unavailable(b, cmd, "too many writes are waiting; retry shortly");
		return;
	}
	if (cmd->idem_key[0] && !idem_mark(b, cmd, &busy)) {
		if (busy)
			answer(b, cmd, 409,
			       http_problem_json(
				       409, "request_in_progress", "Request in progress",
				       "a request with this Idempotency-Key is still being processed"),
			       json_pack("{s:s}", "Retry-After", "1"), false);
		else
			answer_unavailable(b, cmd, "out of memory");
		return;
	}
	cmd->next = NULL;
	if (b->tail)
		b->tail->next = cmd;
	else
		b->head = cmd;
	b->tail = cmd;
	b->npending++;
	start_batch(b);
}

void batcher_kick(struct batcher *b)
{
	start_batch(b);
}

void batcher_reconnected(struct batcher *b)
{
	/* The new session may be another database (re-created, restored, a failover to a
	 * standby that lacks the last commits): only the log is the truth. Nothing points
	 * into the cache between batches, and a lost connection ended the batch. */
	strmap_clear(b->cache);
	start_batch(b);
}

bool batcher_idle(const struct batcher *b)
{
	return b->state == B_IDLE && b->head == NULL;
}

/* Free the batch's working state (answers already sent or commands requeued). */
static void reset_batch(struct batcher *b)
{
	for (size_t i = 0; i < b->nevents; i++) {
		free(b->events[i].snapshot);
	}
	for (size_t i = 0; i < b->nslots; i++) {
		json_decref(b->slots[i].body);
		json_decref(b->slots[i].headers);
	}
	memset(b->slots, 0, b->nslots * sizeof(b->slots[0]));
	b->text.len = 0;
	b->text.failed = false;
	b->nslots = b->nevents = b->noverlay = 0;
	strmap_clear(b->overlay);
	strmap_clear(b->transfers);
	strmap_clear(b->refold);
	strmap_clear(b->catchup);
	b->state = B_IDLE;
}

static void fail_batch(struct batcher *b, int status, const char *why)
{
	invalidate(b);
	for (size_t i = 0; i < b->nslots; i++) {
		if (status == 503)
			answer_unavailable(b, b->slots[i].cmd, why);
		else
			answer_problem(b, b->slots[i].cmd, status, "internal", "Internal error",
				       why);
		b->slots[i].cmd = NULL;
	}
	reset_batch(b);
}

/* The batch was sent and then the connection died or its deadline passed: whether it
 * committed is unknown. Its clients get 503 outcome_unknown; a retry with the same
 * Idempotency-Key then applies each exactly once (the key commits with the events). */
static void fail_batch_unknown(struct batcher *b, const char *why)
{
	log_warn(&b->ctx->log, "the outcome of a batch of %zu is unknown: %s", b->nslots, why);
	invalidate(b);
	for (size_t i = 0; i < b->nslots; i++) {
		metric_add(b->unavailable, 1);
		answer_problem(b, b->slots[i].cmd, 503, "outcome_unknown", "Outcome unknown",
			       "the event store did not confirm the write in time; it may or may not "
			       "have been applied: retry with the same Idempotency-Key to apply it "
			       "exactly once");
		b->slots[i].cmd = NULL;
	}
	reset_batch(b);
}

/* Answer every queued command with 503: the connection is gone. */
static void fail_pending(struct batcher *b, const char *why)
{
	while (b->head) {
		struct cmd *cmd = b->head;
		b->head = cmd->next;
		answer_unavailable(b, cmd, why);
	}
	b->tail = NULL;
	b->npending = 0;
}

/* Answer every queued command with 503 not_leader. */
static void fail_pending_not_leader(struct batcher *b)
{
	while (b->head) {
		struct cmd *cmd = b->head;
		b->head = cmd->next;
		answer_not_leader(b, cmd);
	}
	b->tail = NULL;
	b->npending = 0;
}

/* The batch's term is over (fenced, or ended while it was loading): nothing was
 * written; forget what it loaded and answer its commands 503 not_leader. */
static void fail_batch_not_leader(struct batcher *b)
{
	invalidate(b);
	for (size_t i = 0; i < b->nslots; i++) {
		answer_not_leader(b, b->slots[i].cmd);
		b->slots[i].cmd = NULL;
	}
	reset_batch(b);
}

void batcher_leadership(struct batcher *b, bool leading)
{
	strmap_clear(b->cache);
	if (!leading)
		fail_pending_not_leader(b);
}

/* Answer every slot of a committed (or write-free) batch; positions from `results`. */
static void answer_all(struct batcher *b, PGresult *const *results)
{
	for (size_t i = 0; i < b->nslots; i++) {
		struct slot *s = &b->slots[i];
		const char *position = s->status == 201 && !s->replay && s->last_event >= 0 &&
						       results
					       ? append_position(b, results, s->last_event)
					       : POSITION_PLACEHOLDER;
		if (s->replay)
			metric_add(b->replays, 1);
		if (s->text) {
			struct cmd_outcome out = { .status = s->status };
			out.text = slot_body(b, s, position, &out.text_len);
			out.etag = s->etag ? b->text.p + s->etag : NULL;
			out.location = s->location ? b->text.p + s->location : NULL;
			idem_release(b, s->cmd);
			b->hooks.settle(b->hooks.arg, s->cmd, &out);
			s->cmd = NULL;
			continue;
		}
		if (s->status == 201 && !s->replay && s->last_event >= 0 && results)
			json_object_set_new(s->body, "position", json_string(position));
		answer(b, s->cmd, s->status, s->body, s->headers, s->replay);
		s->body = s->headers = NULL;
		s->cmd = NULL;
	}
}

/* What a failure PostgreSQL reported for a batch means for its commands. */
enum failure {
	/* Lost a race with another writer (a version or transfer id taken, a
	 * serialization failure, a deadlock): retried alone, from fresh state. */
	FAIL_CONFLICT,
	/* The database cannot take writes just now (overloaded, a deadline passed, shutting
	 * down, its NOTIFY queue full): 503 at once, nothing was written. */
	FAIL_TRANSIENT,
	/* PostgreSQL refused the data itself (a constraint or trigger, deferred or not):
	 * the batch is split so that the others are decided as if alone, and the command
	 * refused alone gets 500. Retrying it would be refused again: not transient. */
	FAIL_REFUSED,
};

static enum failure classify(const char *sqlstate)
{
	static const char *const conflicts[] = { "23505", "40", NULL };
	static const char *const transient[] = { "08", "53", "54000", "55P03",
						 "57", "58", "25P03", NULL };

	for (size_t i = 0; conflicts[i]; i++)
		if (strncmp(sqlstate, conflicts[i], strlen(conflicts[i])) == 0)
			return FAIL_CONFLICT;
	for (size_t i = 0; transient[i]; i++)
		if (strncmp(sqlstate, transient[i], strlen(transient[i])) == 0)
			return FAIL_TRANSIENT;
	return FAIL_REFUSED;
}

/* After a rollback (nothing was written): put the batch's commands back at the head of
 * the queue, each to be retried alone from fresh state. A command that already ran
 * alone is answered instead when retrying cannot help: refused data gets 500 at once,
 * a conflict that kept recurring 503. */
static void requeue_solo(struct batcher *b, enum failure f, const char *why)
{
	struct cmd *first = NULL, *last = NULL;
	bool alone = b->nslots == 1;

	invalidate(b);
	for (size_t i = 0; i < b->nslots; i++) {
		struct cmd *cmd = b->slots[i].cmd;
		b->slots[i].cmd = NULL;
		++cmd->attempts;
		if (alone && f == FAIL_REFUSED) {
			log_msg(&b->ctx->log, LOG_ERROR, cmd->request_id,
				"this command failed on its own, nothing written: %s", why);
			answer_problem(b, cmd, 500, "internal", "Internal error",
				       "this write cannot be applied and nothing was written; see the "
				       "service log");
			continue;
		}
		if (cmd->attempts >= MAX_ATTEMPTS) {
			log_msg(&b->ctx->log, LOG_WARN, cmd->request_id,
				"append failed %d times: %s", cmd->attempts, why);
			answer_unavailable(b, cmd,
					   "the event store rolled this write back repeatedly "
					   "(concurrent writes); nothing was written, retry shortly");
			continue;
		}
		cmd->solo = true;
		cmd->next = NULL;
		if (last)
			last->next = cmd;
		else
			first = cmd;
		last = cmd;
		b->npending++;
	}
	if (last) {
		last->next = b->head;
		if (!b->head)
			b->tail = last;
		b->head = first;
	}
	reset_batch(b);
}

/* PostgreSQL rolled the batch back, with `res` saying why (at a statement, or at
 * COMMIT): nothing was written, and the cache must forget the batch's effects. */
static void batch_rolled_back(struct batcher *b, const PGresult *res, const char *when)
{
	const char *state = pg_sqlstate(res);
	enum failure f = classify(state);
	char why[256];

	snprintf(why, sizeof(why), "%s", res ? PQresultErrorMessage(res) : "no result");
	why[strcspn(why, "\n")] = '\0';
	log_warn(&b->ctx->log, "batch of %zu rolled back %s (%s): %s", b->nslots, when, state, why);
	if (strcmp(state, COMMAND_SQLSTATE_FENCED) == 0) {
		/* Another instance took the lease while we were frozen or cut off: nothing of
		 * the batch was written. Stand by at once (unless the batch was of an earlier
		 * term of ours, which already ended). */
		bool current = b->epoch == b->ctx->epoch;
		metric_add(b->fenced, 1);
		fail_batch_not_leader(b);
		if (current && b->ctx->epoch) {
			b->hooks.fenced(b->hooks.arg,
					"the batch's fence failed (another instance "
					"took the write lease); nothing was committed");
		}
		start_batch(b);
		return;
	}
	if (f == FAIL_CONFLICT)
		metric_add(b->conflicts, 1);
	if (f == FAIL_TRANSIENT)
		fail_batch(b, 503,
			   "the event store could not take the write just now; nothing was "
			   "written, retry shortly");
	else
		requeue_solo(b, f, why);
	start_batch(b);
}

static double seconds_since(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

static void write_done(void *arg, const struct pg_outcome *out)
{
	struct batcher *b = arg;

	metric_observe(b->commit_seconds, seconds_since(&b->write_start));
	switch (out->status) {
	case PG_RUN_NOT_SENT:
		fail_batch(b, 503,
			   "the event store became unreachable; nothing was written, retry shortly");
		fail_pending(b, "the event store is unreachable; retry shortly");
		return;
	case PG_RUN_UNKNOWN:
		fail_batch_unknown(b, out->error);
		fail_pending(b, "the event store is unreachable; retry shortly");
		return;
	case PG_RUN_COMMIT_FAILED:
		/* Every statement succeeded, yet the transaction did not commit. */
		batch_rolled_back(b, out->commit_error, "at commit");
		return;
	case PG_RUN_DONE:
		break;
	}
	for (size_t i = 0; i < out->n; i++) {
		if (PQresultStatus(out->results[i]) == PGRES_FATAL_ERROR) {
			batch_rolled_back(b, out->results[i], "at a statement");
			return;
		}
	}
	/* PostgreSQL has confirmed the COMMIT (with a synchronous standby: the standby has
	 * it, and every record the batch replays, which came before it): only now is
	 * anything answered 201. The fence passed, so the batch committed before any
	 * takeover; but if our term has ended since, another leader may have written after
	 * it: cache nothing. */
	metric_add(b->events_total, (double)b->nevents);
	if (b->epoch == b->ctx->epoch)
		commit_overlay(b);
	else
		invalidate(b);
	answer_all(b, out->results);
	reset_batch(b);
	start_batch(b);
}

static void write_batch(struct batcher *b)
{
	size_t nrecords;
	bool barrier = false;

	if (!append_queue(b, &nrecords))
		goto fail;
	if (b->nevents == 0 && nrecords == 0) {
		/* Nothing to write: every answer rests on what the log holds. That may be a
		 * write whose COMMIT's wait for the synchronous standby was cut short (our
		 * deadline's cancel, a takeover's pg_terminate_backend: "canceling wait for
		 * synchronous replication"), and so be missing on the standby that a failover
		 * would promote. A replay answered from it at once would acknowledge a write
		 * that may be lost (SPEC §3), and so would a refusal that names it (409
		 * transfer_exists after an outcome_unknown, 422 idempotency_key_reused). So the
		 * batch still commits a transaction: its fence alone, whose row lock takes an
		 * xid and is WAL-logged, so that its COMMIT comes after the record in the WAL
		 * and waits for the standby to have both (a transaction with an xid and no WAL
		 * of its own, such as SELECT pg_current_xact_id(), would not wait: PostgreSQL
		 * waits only for one that wrote WAL before its commit record). Its verdict
		 * answers the batch as a write's does: 503 outcome_unknown when it is lost. A
		 * batch that writes covers its replays with its own COMMIT. */
		if (!append_queue_barrier(b))
			goto fail;
		barrier = true;
	}
	clock_gettime(CLOCK_MONOTONIC, &b->write_start);
	if (!pg_run(b->ctx->pg, write_done, b))
		goto fail;
	if (barrier)
		metric_add(b->barriers, 1);
	else
		metric_observe(b->batch_events, (double)b->nevents);
	b->state = B_WRITING;
	return;
fail:
	fail_batch(b, 503, "the event store became unreachable; retry shortly");
}

static void decide_all(struct batcher *b)
{
	cache_prefetch(b);
	for (size_t i = 0; i < b->nslots; i++) {
		if (b->slots[i].status == 0 && !decide(b, (int)i)) {
			fail_batch(b, 503, "out of memory; retry shortly");
			start_batch(b);
			return;
		}
	}
	write_batch(b);
}

/* A load failed with PostgreSQL's reason `res`: nothing was decided yet. */
static void load_failed(struct batcher *b, const PGresult *res, const char *why)
{
	bool transient = classify(pg_sqlstate(res)) != FAIL_REFUSED;

	log_error(&b->ctx->log, "loading state for a batch of %zu failed (%s): %s", b->nslots,
		  pg_sqlstate(res), why);
	/* A timeout, a cancel, an overload: the client may retry. Anything else is a
	 * defect of this service or of the database's set-up, which a retry will not cure. */
	if (transient)
		fail_batch(b, 503,
			   "loading account state failed; nothing was written, retry shortly");
	else
		fail_batch(b, 500, "loading account state failed; see the service log");
	start_batch(b);
}

/* An account's stream cannot be folded (an event the domain cannot read or apply):
 * only the commands that touch it may fail. Every other command of the batch is
 * retried alone, which decides it without that account; the command that touches it,
 * alone, gets 500 (the log names the stream). */
static void fold_failed(struct batcher *b)
{
	requeue_solo(b, FAIL_REFUSED,
		     "an account's stream cannot be folded (see the log line "
		     "naming the stream)");
	start_batch(b);
}

static void load_done(void *arg, const struct pg_outcome *out)
{
	struct batcher *b = arg;
	PGresult *const *results = out->results;
	char why[256];

	if (out->status == PG_RUN_NOT_SENT || out->status == PG_RUN_UNKNOWN) {
		fail_batch(b, 503,
			   "the event store became unreachable; nothing was written, retry shortly");
		fail_pending(b, "the event store is unreachable; retry shortly");
		return;
	}
	if (b->epoch != b->ctx->epoch) {
		/* Loaded in a term that has ended: what it read may be stale already. */
		fail_batch_not_leader(b);
		start_batch(b);
		return;
	}
	if (!pg_outcome_ok(out, why, sizeof(why))) {
		const PGresult *res = out->commit_error;
		for (size_t i = 0; !res && i < out->n; i++)
			if (PQresultStatus(results[i]) == PGRES_FATAL_ERROR)
				res = results[i];
		load_failed(b, res, why);
		return;
	}
	if (!load_apply(b, results)) {
		fold_failed(b);
		return;
	}
	decide_or_refold(b);
}

/* Decide, once the streams whose snapshot was refused are folded from their first
 * event: one more load round, whose rows load_done folds like the first. */
static void decide_or_refold(struct batcher *b)
{
	if (strmap_count(b->refold) == 0) {
		decide_all(b);
		return;
	}
	if (!load_queue_refold(b) || !pg_run(b->ctx->pg, load_done, b))
		fail_batch(b, 503, "the event store became unreachable; retry shortly");
}

static void start_batch(struct batcher *b)
{
	int queued;

	if (b->state != B_IDLE || !b->head || !pg_ready(b->ctx->pg))
		return;
	/* Leading by our own clock too: a term whose renewal is overdue (we were frozen)
	 * ends here, answering the queue, before anything is sent. */
	b->epoch = lease_epoch(b->ctx->lease);
	if (!b->epoch) {
		fail_pending_not_leader(b);
		return;
	}
	/* A command retried after a conflict goes alone; otherwise take what waits. */
	while (b->head && b->nslots < BATCH_MAX && (b->nslots == 0 || !b->head->solo)) {
		struct cmd *cmd = b->head;
		b->head = cmd->next;
		b->npending--;
		b->slots[b->nslots++].cmd = cmd;
		if (cmd->solo)
			break;
	}
	if (!b->head)
		b->tail = NULL;
	metric_observe(b->batch_size, (double)b->nslots);
	b->state = B_LOADING;
	if (!load_queue(b, &queued) || (queued && !pg_run(b->ctx->pg, load_done, b))) {
		fail_batch(b, 503, "the event store became unreachable; retry shortly");
		return;
	}
	if (!queued)
		decide_all(b);
}
