/* Group commit: concurrent commands are decided together against one state and
 * appended in one PostgreSQL transaction (one round trip, one fsync), and each is
 * answered only once that transaction has committed.
 *
 * A batch goes through two pipelines on the service's single connection:
 *   load  - fold the streams the cache lacks, find stored idempotency records and
 *           used transfer ids (skipped when nothing is missing);
 *   write - INSERT every event and idempotency record; the pipeline's sync commits
 *           them as one implicit transaction, or rolls all of them back.
 * Decisions run in memory against a batch-local overlay of the account cache, so a
 * command that a rule refuses refuses only itself. Should the write fail anyway (a
 * concurrent writer elsewhere took a version or a transfer id), nothing was written:
 * the batch's commands are retried one by one from fresh state, so one command's
 * conflict never fails another.
 *
 * Only the leader writes (command_leadership, sql/012): a batch takes the epoch of the
 * term it starts in, and its write pipeline ends with command_fence(epoch), so a batch
 * of a deposed leader rolls back (SQLSTATE DBF01) instead of committing; its commands
 * get 503 not_leader, and the instance stands by. A batch whose term ended while it
 * was in flight puts nothing into the cache. */
#include <event2/buffer.h>
#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "command.h"

#define BATCH_MAX 256
#define PENDING_MAX 20000
#define CACHE_MAX 200000
#define MAX_ATTEMPTS 3
#define POSITION_PLACEHOLDER "?"
/* An account's state is snapshotted at every multiple of this version, so that
 * loading it reads at most this many events after its newest snapshot. */
#define SNAPSHOT_EVERY 1000

static const struct pg_statement statements[] = {
	/* Per stream: its newest snapshot (type NULL; `logged`: the event at its version is
	 * in the log), then the events after it; a stream without one from its first event.
	 * Rows: stream, version, type, data, logged. */
	{ "load_streams",
	  "WITH s AS (SELECT w.stream, n.version, n.state FROM unnest($1::text[]) AS w(stream) "
	  "LEFT JOIN LATERAL (SELECT a.version, a.state FROM account_snapshots a "
	  "WHERE a.stream = w.stream ORDER BY a.version DESC LIMIT 1) n ON true) "
	  "SELECT s.stream, s.version, NULL::text, s.state::text, EXISTS (SELECT 1 FROM events e "
	  "WHERE e.stream = s.stream AND e.version = s.version) FROM s WHERE s.version IS NOT NULL "
	  "UNION ALL "
	  "SELECT e.stream, e.version, e.type, e.data::text, true FROM s JOIN events e "
	  "ON e.stream = s.stream AND e.version > coalesce(s.version, 0) "
	  "ORDER BY 1, 2" },
	/* The same rows without snapshots: for streams whose snapshot was refused. */
	{ "load_streams_full",
	  "SELECT stream, version, type, data::text, true FROM events "
	  "WHERE stream = ANY($1::text[]) ORDER BY stream, version" },
	{ "load_idem",
	  "SELECT token_id, key, encode(request_hash, 'hex'), status, headers::text, body "
	  "FROM idempotency_keys WHERE (token_id, key) IN "
	  "(SELECT * FROM unnest($1::text[], $2::text[]))" },
	{ "load_transfers",
	  "SELECT data->>'transfer_id' FROM events "
	  "WHERE type = 'TransferSent' AND data->>'transfer_id' = ANY($1::text[])" },
	{ "append",
	  "INSERT INTO events (stream, version, type, data, metadata) "
	  "VALUES ($1, $2, $3, $4, $5) RETURNING txid::text || '.' || position::text" },
	/* The record commits with the events, before their positions are known to us,
	 * so the stored body gets its position from the log in the same statement. */
	{ "idem_put",
	  "INSERT INTO idempotency_keys (token_id, key, request_hash, status, headers, body) "
	  "VALUES ($1, $2, decode($3, 'hex'), $4, $5, replace($6, '\"position\":\"" POSITION_PLACEHOLDER
	  "\"', coalesce((SELECT '\"position\":\"' || txid::text || '.' || position::text || '\"' "
	  "FROM events WHERE stream = $7 AND version = $8::integer), '')))" },
	/* A snapshot commits with the event at its version. An existing one (which only
	 * someone other than this service could have put there) is left alone: the load
	 * checks snapshots before using them. */
	{ "snapshot_put",
	  "INSERT INTO account_snapshots (stream, version, state) VALUES ($1, $2::integer, $3::jsonb) "
	  "ON CONFLICT DO NOTHING" },
	/* Last in every write pipeline: fails with DBF01 unless $1 is the lease's epoch. */
	{ "fence", "SELECT command_fence($1::bigint)" },
};

/* A command's outcome within the batch. */
struct slot {
	struct cmd *cmd;
	int status;       /* 0 while undecided */
	json_t *body;     /* the response body, owned */
	json_t *headers;  /* {"ETag": ..., "Location": ...}, owned */
	bool replay;      /* answered from a stored record */
	bool unrecorded;  /* an outcome that must not be stored (a key reused) */
	int last_event;   /* index of its last event in the batch, -1 for none */
};

struct pending_event {
	char stream[LEDGER_ID_MAX + 16];
	char version[12];
	const char *type;
	char *data, *metadata; /* owned */
	char *snapshot;        /* the account's state after this event, or NULL; owned */
	int slot;
};

enum batch_state { B_IDLE, B_LOADING, B_WRITING };

struct batcher {
	struct command_ctx *ctx;
	struct cmd *head, *tail; /* commands waiting for the next batch */
	size_t npending;
	struct strmap *cache;    /* account id -> struct ledger_account, committed state */
	struct strmap *inflight; /* "token\x1fkey" -> the keyed command that owns it, until answered */
	enum batch_state state;
	/* The batch in flight. */
	long long epoch;          /* the term it was started in: its fence */
	struct slot slots[BATCH_MAX];
	size_t nslots;
	struct pending_event events[2 * BATCH_MAX];
	size_t nevents;
	struct strmap *overlay;   /* account id -> struct ledger_account, this batch's view */
	struct strmap *transfers; /* transfer ids already in the log or taken in this batch */
	struct strmap *refold;    /* account ids whose snapshot was refused: load them in full */
	struct strmap *catchup;   /* account id -> struct ledger_account loaded from more than
				   * SNAPSHOT_EVERY events: snapshot it with this batch's write */
	int q_streams, q_idem, q_transfers; /* result index of each load query, -1: not sent */
	struct metric *batch_size, *events_total, *replays, *conflicts, *unavailable, *fenced,
		*not_leader;
	struct metric *commit_seconds, *batch_events;
	struct timespec write_start; /* when the batch's write transaction was sent */
};

static void start_batch(struct batcher *b);
static void decide_or_refold(struct batcher *b);
static bool queue_lookup(struct batcher *b, const char *stmt, int nparams, char **params);

static struct ledger_account *account_new(const char *id)
{
	struct ledger_account *acc = calloc(1, sizeof(*acc));

	if (acc)
		snprintf(acc->id, sizeof(acc->id), "%s", id);
	return acc;
}

int batcher_open(struct batcher **out, struct command_ctx *ctx)
{
	struct batcher *b = calloc(1, sizeof(*b));
	struct metrics *m = ctx->metrics;

	*out = NULL;
	if (!b || strmap_open(&b->cache, free) || strmap_open(&b->inflight, NULL) ||
	    strmap_open(&b->overlay, free) || strmap_open(&b->transfers, NULL) ||
	    strmap_open(&b->refold, NULL) || strmap_open(&b->catchup, free)) {
		batcher_close(&b);
		return -1;
	}
	b->ctx = ctx;
	b->batch_size = metrics_get(m, METRIC_HISTOGRAM, "daybook_append_batch_size",
				    "Commands per group-commit transaction.", "", metrics_size_buckets,
				    metrics_size_buckets_len);
	b->events_total = metrics_get(m, METRIC_COUNTER, "daybook_events_appended_total",
				      "Events committed to the event store.", "", NULL, 0);
	b->replays = metrics_get(m, METRIC_COUNTER, "daybook_idempotent_replays_total",
				 "Requests answered from a stored idempotency record.", "", NULL, 0);
	b->conflicts = metrics_get(m, METRIC_COUNTER, "daybook_append_conflicts_total",
				   "Batches rolled back by a conflict and retried one by one.", "", NULL, 0);
	b->unavailable = metrics_get(m, METRIC_COUNTER, "daybook_append_unavailable_total",
				     "Commands refused because PostgreSQL was unreachable.", "", NULL, 0);
	b->fenced = metrics_get(m, METRIC_COUNTER, "daybook_append_fenced_total",
				"Batches rolled back because another instance took the write lease.",
				"", NULL, 0);
	b->not_leader = metrics_get(m, METRIC_COUNTER, "daybook_append_not_leader_total",
				    "Commands refused because this instance does not lead.", "", NULL, 0);
	b->commit_seconds = metrics_get(m, METRIC_HISTOGRAM, "daybook_append_commit_seconds",
					"Time from sending a batch's write transaction to PostgreSQL's "
					"verdict on its COMMIT, whatever the verdict.",
					"", metrics_latency_buckets, metrics_latency_buckets_len);
	b->batch_events = metrics_get(m, METRIC_HISTOGRAM, "daybook_append_batch_events",
				      "Events per write transaction.", "", metrics_size_buckets,
				      metrics_size_buckets_len);
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
		cmd_free(c);
	}
	strmap_close(&b->cache);
	strmap_close(&b->inflight);
	strmap_close(&b->overlay);
	strmap_close(&b->transfers);
	strmap_close(&b->refold);
	strmap_close(&b->catchup);
	free(b);
	*bp = NULL;
}

const struct pg_statement *command_statements(size_t *n)
{
	*n = sizeof(statements) / sizeof(statements[0]);
	return statements;
}

static void inflight_key(const struct cmd *cmd, char *out, size_t len)
{
	snprintf(out, len, "%s\x1f%s", cmd->token_id, cmd->idem_key);
}

/* Answer a command and forget it; steals body and headers. */
static void answer(struct batcher *b, struct cmd *cmd, int status, json_t *body, json_t *headers,
		   bool replay)
{
	struct http_request *req = cmd->req;
	const char *name;
	json_t *value;

	if (cmd->idem_key[0]) {
		char key[400];
		inflight_key(cmd, key, sizeof(key));
		/* Only the command that holds the marker releases it: a repeat answered 409
		 * must leave the first request's marker in place. */
		if (strmap_get(b->inflight, key) == cmd)
			strmap_remove(b->inflight, key);
	}
	json_object_foreach(headers, name, value)
		if (json_is_string(value))
			http_set_header(req, name, json_string_value(value));
	json_decref(headers);
	if (replay)
		http_set_header(req, "Idempotent-Replayed", "true");
	if (status == 503)
		http_set_header(req, "Retry-After", "1");
	if (status >= 400) {
		char *text = json_dumps(body, JSON_COMPACT);
		http_reply_raw(req, status, "application/problem+json", text ? text : "{}",
			       text ? strlen(text) : 2);
		free(text);
		json_decref(body);
	} else {
		http_reply_json(req, status, body);
	}
	cmd_free(cmd);
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
	if (cmd->idem_key[0]) {
		char key[400];
		inflight_key(cmd, key, sizeof(key));
		if (strmap_get(b->inflight, key)) {
			answer(b, cmd, 409,
			       http_problem_json(409, "request_in_progress", "Request in progress",
						 "a request with this Idempotency-Key is still being processed"),
			       json_pack("{s:s}", "Retry-After", "1"), false);
			return;
		}
		/* The marker's value is its owner: see answer(). */
		if (!strmap_put(b->inflight, key, cmd)) {
			answer_unavailable(b, cmd, "out of memory");
			return;
		}
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
		free(b->events[i].data);
		free(b->events[i].metadata);
		free(b->events[i].snapshot);
	}
	for (size_t i = 0; i < b->nslots; i++) {
		json_decref(b->slots[i].body);
		json_decref(b->slots[i].headers);
	}
	memset(b->slots, 0, b->nslots * sizeof(b->slots[0]));
	b->nslots = b->nevents = 0;
	strmap_clear(b->overlay);
	strmap_clear(b->transfers);
	strmap_clear(b->refold);
	strmap_clear(b->catchup);
	b->state = B_IDLE;
}

/* Every account id a command touches. */
static size_t cmd_accounts(const struct cmd *cmd, const char *ids[2])
{
	switch (cmd->kind) {
	case CMD_OPEN:
		ids[0] = cmd->u.open.id;
		return 1;
	case CMD_TRANSFER:
		ids[0] = cmd->u.transfer.from;
		ids[1] = cmd->u.transfer.to;
		return 2;
	default:
		ids[0] = cmd->account;
		return 1;
	}
}

/* Forget cached state the batch may have changed: after a failure, what committed is
 * unknown or was refused, and the log is the only truth. */
static void invalidate(struct batcher *b)
{
	for (size_t i = 0; i < b->nslots; i++) {
		const char *ids[2];
		size_t n = cmd_accounts(b->slots[i].cmd, ids);
		for (size_t j = 0; j < n; j++)
			strmap_remove(b->cache, ids[j]);
	}
}

static void fail_batch(struct batcher *b, int status, const char *why)
{
	invalidate(b);
	for (size_t i = 0; i < b->nslots; i++) {
		if (status == 503)
			answer_unavailable(b, b->slots[i].cmd, why);
		else
			answer_problem(b, b->slots[i].cmd, status, "internal", "Internal error", why);
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

/* Build a text[] literal of ids with a prefix ("account-"), or of plain strings. */
static char *array_literal(const char *const *items, size_t n, const char *prefix)
{
	struct evbuffer *buf = evbuffer_new();
	char *out = NULL, tmp[LEDGER_ID_MAX + 32];
	size_t len;

	if (!buf)
		return NULL;
	evbuffer_add(buf, "{", 1);
	for (size_t i = 0; i < n; i++) {
		snprintf(tmp, sizeof(tmp), "%s%s", prefix, items[i]);
		pg_array_append(buf, prefix[0] ? tmp : items[i], i == 0);
	}
	evbuffer_add(buf, "}", 2); /* with the NUL */
	len = evbuffer_get_length(buf);
	out = malloc(len);
	if (out)
		evbuffer_remove(buf, out, len);
	evbuffer_free(buf);
	return out;
}

/* --- deciding ------------------------------------------------------------------ */

/* This batch's view of an account: the overlay, else a copy of the cache, else
 * a fresh "does not exist" (the load phase fetched every account the cache lacks). */
static struct ledger_account *view(struct batcher *b, const char *id)
{
	struct ledger_account *acc = strmap_get(b->overlay, id), *cached;

	if (acc)
		return acc;
	acc = account_new(id);
	if (!acc)
		return NULL;
	cached = strmap_get(b->cache, id);
	if (cached)
		*acc = *cached;
	if (!strmap_put(b->overlay, id, acc)) {
		free(acc);
		return NULL;
	}
	return acc;
}

static json_t *metadata_json(const struct cmd *cmd)
{
	json_t *m = json_pack("{s:s, s:s, s:s}", "request_id", cmd->request_id, "token_id",
			      cmd->token_id, "time", cmd->time);

	if (m && cmd->idem_key[0])
		json_object_set_new(m, "idempotency_key", json_string(cmd->idem_key));
	return m;
}

/* An account's state as a snapshot stores it; caller frees. NULL when out of memory. */
static char *state_text(const struct ledger_account *acc)
{
	json_t *state = ledger_account_to_json(acc);
	char *text = state ? json_dumps(state, JSON_COMPACT) : NULL;

	json_decref(state);
	return text;
}

/* Record an event for the write pipeline and fold it into the overlay; an event that
 * brings its account to a multiple of SNAPSHOT_EVERY carries a snapshot. */
static bool add_event(struct batcher *b, int slot, struct ledger_account *acc,
		      const struct ledger_event *ev)
{
	struct pending_event *pe = &b->events[b->nevents];
	json_t *data, *meta;

	if (!ledger_evolve(acc, ev))
		return false;
	data = ledger_event_to_json(ev);
	meta = metadata_json(b->slots[slot].cmd);
	pe->data = data ? json_dumps(data, JSON_COMPACT) : NULL;
	pe->metadata = meta ? json_dumps(meta, JSON_COMPACT) : NULL;
	pe->snapshot = acc->version % SNAPSHOT_EVERY == 0 ? state_text(acc) : NULL;
	json_decref(data);
	json_decref(meta);
	if (!pe->data || !pe->metadata || (acc->version % SNAPSHOT_EVERY == 0 && !pe->snapshot)) {
		free(pe->data);
		free(pe->metadata);
		free(pe->snapshot);
		return false;
	}
	snprintf(pe->stream, sizeof(pe->stream), "account-%s", acc->id);
	snprintf(pe->version, sizeof(pe->version), "%" PRId32, acc->version);
	pe->type = ledger_event_name(ev->type);
	pe->slot = slot;
	b->slots[slot].last_event = (int)b->nevents++;
	return true;
}

static void etag(json_t *headers, int32_t version)
{
	char tag[16];

	snprintf(tag, sizeof(tag), "\"%" PRId32 "\"", version);
	json_object_set_new(headers, "ETag", json_string(tag));
}

static void set_refusal(struct slot *s, enum ledger_error err, const char *detail)
{
	s->status = ledger_error_status(err);
	s->body = http_problem_json(s->status, ledger_error_code(err), ledger_error_title(err), detail);
	s->headers = json_object();
}

/* Human detail for a refusal, naming the entities involved. */
static void refusal_detail(const struct cmd *cmd, enum ledger_error err,
			   const struct ledger_account *acc, char *out, size_t len)
{
	const char *id = cmd->kind == CMD_OPEN ? cmd->u.open.id : cmd->account;

	switch (err) {
	case LEDGER_ACCOUNT_NOT_FOUND:
		snprintf(out, len, "account '%s' does not exist", acc ? acc->id : id);
		break;
	case LEDGER_VERSION_MISMATCH:
		snprintf(out, len, "account '%s' is at version %" PRId32 ", not %" PRId32, id,
			 acc ? acc->version : 0, cmd->expected_version);
		break;
	case LEDGER_TRANSFER_EXISTS:
		snprintf(out, len, "transfer '%s' already exists", cmd->u.transfer.id);
		break;
	default:
		snprintf(out, len, "%s", ledger_error_title(err));
		if (acc)
			snprintf(out, len, "%s (account '%s')", ledger_error_title(err), acc->id);
		break;
	}
}

/* Decide slot i's transfer: *err is LEDGER_OK or the refusal (naming *blame). False
 * when memory ran out: the batch's overlay can no longer be trusted. */
static bool decide_transfer(struct batcher *b, int i, enum ledger_error *err,
			    struct ledger_account **blame)
{
	struct cmd *cmd = b->slots[i].cmd;
	const struct ledger_transfer_body *t = &cmd->u.transfer;
	struct ledger_account *from = view(b, t->from), *to = view(b, t->to);
	struct ledger_event ev[2];
	char location[LEDGER_ID_MAX + 16];

	if (!from || !to)
		return false;
	if (strmap_get(b->transfers, t->id)) {
		*err = LEDGER_TRANSFER_EXISTS;
		return true;
	}
	*err = ledger_decide_transfer(from, to, t->id, t->amount, t->reference, ev);
	*blame = !ledger_account_exists(from) || from->closed || *err == LEDGER_INSUFFICIENT_FUNDS
			 ? from : to;
	if (*err)
		return true;
	if (!add_event(b, i, from, &ev[0]) || !add_event(b, i, to, &ev[1]) ||
	    !strmap_put(b->transfers, t->id, b))
		return false;
	/* The transfer as the query API serves it (ids are [A-Za-z0-9._:-]: no escaping). */
	snprintf(location, sizeof(location), "/transfers/%s", t->id);
	json_object_set_new(b->slots[i].headers, "Location", json_string(location));
	b->slots[i].body = json_pack("{s:s, s:I, s:I, s:s}", "transfer_id", t->id, "from_version",
				     (json_int_t)from->version, "to_version", (json_int_t)to->version,
				     "position", POSITION_PLACEHOLDER);
	return true;
}

/* Decide slot i's command on one account: as decide_transfer. */
static bool decide_account(struct batcher *b, int i, enum ledger_error *err,
			   struct ledger_account **blame)
{
	struct cmd *cmd = b->slots[i].cmd;
	const char *id = cmd->kind == CMD_OPEN ? cmd->u.open.id : cmd->account;
	struct ledger_account *acc = view(b, id);
	struct ledger_event ev;
	char location[LEDGER_ID_MAX + 16];

	*blame = acc;
	if (!acc)
		return false;
	*err = LEDGER_OK;
	switch (cmd->kind) {
	case CMD_OPEN:
		*err = ledger_decide_open(acc, id, cmd->u.open.name, cmd->u.open.currency,
					  cmd->u.open.overdraft_limit, &ev);
		break;
	case CMD_DEPOSIT:
		*err = ledger_decide_deposit(acc, cmd->expected_version, cmd->u.money.amount,
					     cmd->u.money.reference, &ev);
		break;
	case CMD_WITHDRAW:
		*err = ledger_decide_withdraw(acc, cmd->expected_version, cmd->u.money.amount,
					      cmd->u.money.reference, &ev);
		break;
	case CMD_CLOSE:
		*err = ledger_decide_close(acc, cmd->expected_version, &ev);
		break;
	case CMD_TRANSFER:
		break;
	}
	if (*err)
		return true;
	if (!add_event(b, i, acc, &ev))
		return false;
	etag(b->slots[i].headers, acc->version);
	if (cmd->kind == CMD_OPEN) {
		snprintf(location, sizeof(location), "/accounts/%s", id);
		json_object_set_new(b->slots[i].headers, "Location", json_string(location));
	}
	b->slots[i].body = json_pack("{s:s, s:I}", "account_id", id, "version", (json_int_t)acc->version);
	if (cmd->kind == CMD_DEPOSIT || cmd->kind == CMD_WITHDRAW)
		json_object_set_new(b->slots[i].body, "balance", json_integer(acc->balance));
	json_object_set_new(b->slots[i].body, "position", json_string(POSITION_PLACEHOLDER));
	return true;
}

/* Decide slot i; false when memory ran out (the batch must be abandoned). */
static bool decide(struct batcher *b, int i)
{
	struct slot *s = &b->slots[i];
	struct ledger_account *blame = NULL;
	enum ledger_error err = LEDGER_OK;
	char detail[256];

	s->last_event = -1;
	s->headers = json_object();
	if (!(s->cmd->kind == CMD_TRANSFER ? decide_transfer(b, i, &err, &blame)
					   : decide_account(b, i, &err, &blame)))
		return false;
	if (err == LEDGER_OK) {
		s->status = 201;
		return true;
	}
	json_decref(s->headers);
	json_decref(s->body);
	s->body = NULL;
	refusal_detail(s->cmd, err, blame, detail, sizeof(detail));
	set_refusal(s, err, detail);
	return true;
}

/* --- writing ------------------------------------------------------------------- */

static bool queue_event(struct batcher *b, const struct pending_event *pe)
{
	const char *v[5] = { pe->stream, pe->version, pe->type, pe->data, pe->metadata };
	return pg_queue(b->ctx->pg, "append", 5, v);
}

static bool queue_snapshot(struct batcher *b, const char *stream, const char *version,
			   const char *state)
{
	const char *v[3] = { stream, version, state };
	return pg_queue(b->ctx->pg, "snapshot_put", 3, v);
}

struct catchup_queue {
	struct batcher *b;
	bool ok;
};

/* The committed state of an account that lacked a recent snapshot. */
static void queue_catchup(void *arg, const char *id, void *value)
{
	struct catchup_queue *q = arg;
	const struct ledger_account *acc = value;
	char stream[LEDGER_ID_MAX + 16], version[12], *state;

	if (!q->ok)
		return;
	snprintf(stream, sizeof(stream), "account-%s", id);
	snprintf(version, sizeof(version), "%" PRId32, acc->version);
	state = state_text(acc);
	q->ok = state && queue_snapshot(q->b, stream, version, state);
	free(state);
}

/* Snapshots go after every event and record, so that result i stays event i's: those
 * the batch's events are due, then those its loads found missing. */
static bool queue_snapshots(struct batcher *b)
{
	struct catchup_queue q = { b, true };

	for (size_t i = 0; i < b->nevents; i++) {
		const struct pending_event *pe = &b->events[i];
		if (pe->snapshot && !queue_snapshot(b, pe->stream, pe->version, pe->snapshot))
			return false;
	}
	strmap_foreach(b->catchup, queue_catchup, &q);
	return q.ok;
}

/* Last: the fence (see the top of this file and sql/012). Its row lock lasts only from
 * here to COMMIT, so a batch waiting on a lock (another writer's row, say) does not
 * hold up the lease's renewal. */
static bool queue_fence(struct batcher *b)
{
	char epoch[24];
	const char *v[1] = { epoch };

	snprintf(epoch, sizeof(epoch), "%lld", b->epoch);
	return pg_queue(b->ctx->pg, "fence", 1, v);
}

/* Decided outcomes worth replaying: successes and business refusals. */
static bool keeps_record(const struct slot *s)
{
	return s->cmd->idem_key[0] && !s->replay && !s->unrecorded && s->status != 0 &&
	       s->status < 500;
}

static bool queue_record(struct batcher *b, const struct slot *s)
{
	const struct cmd *cmd = s->cmd;
	const struct pending_event *last = s->last_event >= 0 ? &b->events[s->last_event] : NULL;
	char status[8], *headers, *body;

	/* A refusal names the request it answered; its replays return the same body, so
	 * they name that first request too. */
	if (s->status >= 400 && json_is_object(s->body) && !json_object_get(s->body, "instance"))
		json_object_set_new(s->body, "instance", json_string(http_request_id(cmd->req)));
	headers = json_dumps(s->headers, JSON_COMPACT);
	body = json_dumps(s->body, JSON_COMPACT);
	const char *v[8] = { cmd->token_id, cmd->idem_key, cmd->idem_hash, status, headers, body,
			     last ? last->stream : NULL, last ? last->version : NULL };
	bool ok = false;

	if (!headers || !body)
		goto done;
	snprintf(status, sizeof(status), "%d", s->status);
	ok = pg_queue(b->ctx->pg, "idem_put", 8, v);
done:
	free(headers);
	free(body);
	return ok;
}

/* Answer every slot of a committed (or write-free) batch; positions from `results`. */
static void answer_all(struct batcher *b, PGresult *const *results)
{
	for (size_t i = 0; i < b->nslots; i++) {
		struct slot *s = &b->slots[i];
		if (s->status == 201 && !s->replay && s->last_event >= 0 && results) {
			PGresult *r = results[s->last_event];
			json_object_set_new(s->body, "position", json_string(PQgetvalue(r, 0, 0)));
		}
		if (s->replay)
			metric_add(b->replays, 1);
		answer(b, s->cmd, s->status, s->body, s->headers, s->replay);
		s->body = s->headers = NULL;
		s->cmd = NULL;
	}
}

/* Move the overlay's accounts into the cache: they are now committed state. */
static void commit_overlay(struct batcher *b)
{
	if (strmap_count(b->cache) + strmap_count(b->overlay) > CACHE_MAX)
		strmap_clear(b->cache); /* crude bound on memory; cold accounts reload */
	for (size_t i = 0; i < b->nevents; i++) {
		const char *id = b->events[i].stream + strlen("account-");
		struct ledger_account *acc = strmap_get(b->overlay, id), *copy;
		if (!acc || strmap_get(b->cache, id) == acc)
			continue;
		copy = malloc(sizeof(*copy));
		if (!copy)
			continue;
		*copy = *acc;
		if (!strmap_put(b->cache, id, copy))
			free(copy);
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
	static const char *const transient[] = { "08", "53", "54000", "55P03", "57", "58", "25P03",
						 NULL };

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
			log_msg(&b->ctx->log, LOG_WARN, cmd->request_id, "append failed %d times: %s",
				cmd->attempts, why);
			answer_unavailable(b, cmd, "the event store rolled this write back repeatedly "
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
			lease_lost(b->ctx->lease);
			command_leadership(b->ctx, 0, "the batch's fence failed (another instance took "
						      "the write lease); nothing was committed");
		}
		start_batch(b);
		return;
	}
	if (f == FAIL_CONFLICT)
		metric_add(b->conflicts, 1);
	if (f == FAIL_TRANSIENT)
		fail_batch(b, 503, "the event store could not take the write just now; nothing was "
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
		fail_batch(b, 503, "the event store became unreachable; nothing was written, retry shortly");
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
	/* PostgreSQL has confirmed the COMMIT: only now is anything answered 201. The
	 * fence passed, so the batch committed before any takeover; but if our term has
	 * ended since, another leader may have written after it: cache nothing. */
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
	size_t nrecords = 0;

	for (size_t i = 0; i < b->nevents; i++)
		if (!queue_event(b, &b->events[i]))
			goto fail;
	for (size_t i = 0; i < b->nslots; i++) {
		if (!keeps_record(&b->slots[i]))
			continue;
		if (!queue_record(b, &b->slots[i]))
			goto fail;
		nrecords++;
	}
	if (b->nevents == 0 && nrecords == 0) {
		/* Nothing to write: every answer rests on committed state. */
		answer_all(b, NULL);
		reset_batch(b);
		start_batch(b);
		return;
	}
	if (!queue_snapshots(b) || !queue_fence(b))
		goto fail;
	clock_gettime(CLOCK_MONOTONIC, &b->write_start);
	if (!pg_run(b->ctx->pg, write_done, b))
		goto fail;
	metric_observe(b->batch_events, (double)b->nevents);
	b->state = B_WRITING;
	return;
fail:
	fail_batch(b, 503, "the event store became unreachable; retry shortly");
}

/* --- loading ------------------------------------------------------------------- */

/* Start acc from a loaded snapshot row, after checking it: its event is in the log,
 * its state decodes into a plausible account of this stream at this version. False
 * (with the reason in why) when it cannot be used. */
static bool restore_snapshot(PGresult *r, int row, struct ledger_account *acc, char *why,
			     size_t whylen)
{
	json_t *state = json_loads(PQgetvalue(r, row, 3), 0, NULL);
	struct ledger_account snap;
	bool ok = false;

	if (strcmp(PQgetvalue(r, row, 4), "t") != 0) {
		snprintf(why, whylen, "the log has no event at its version");
		goto done;
	}
	if (!ledger_account_from_json(state, &snap, why, whylen))
		goto done;
	if (strcmp(snap.id, acc->id) != 0) {
		snprintf(why, whylen, "it is the state of account '%s'", snap.id);
		goto done;
	}
	if (snap.version != atoi(PQgetvalue(r, row, 1))) {
		snprintf(why, whylen, "its state is at version %" PRId32, snap.version);
		goto done;
	}
	*acc = snap;
	ok = true;
done:
	json_decref(state);
	return ok;
}

/* Fold one event row into acc; its version must be the next one. */
static bool fold_event(PGresult *r, int row, struct ledger_account *acc)
{
	enum ledger_event_type type = ledger_event_type_from_name(PQgetvalue(r, row, 2));
	json_t *data = json_loads(PQgetvalue(r, row, 3), 0, NULL);
	struct ledger_event ev;
	bool ok = false;

	if (!data || !type || atol(PQgetvalue(r, row, 1)) != (long)acc->version + 1 ||
	    !ledger_event_from_json(type, data, &ev))
		goto done;
	if (type == LEDGER_ACCOUNT_OPENED)
		ev.account_id = acc->id;
	ok = ledger_evolve(acc, &ev);
done:
	json_decref(data);
	return ok;
}

/* An account folded from more events than snapshots should leave (none was written:
 * an older binary wrote them, or its snapshot was refused) gets one with the batch's
 * write, so that its next load is short again. */
static bool note_catchup(struct batcher *b, const struct ledger_account *acc, int folded)
{
	struct ledger_account *copy;

	if (!acc || folded < SNAPSHOT_EVERY)
		return true;
	copy = malloc(sizeof(*copy));
	if (!copy)
		return false;
	*copy = *acc;
	if (!strmap_put(b->catchup, acc->id, copy)) {
		free(copy);
		return false;
	}
	return true;
}

/* Fold the loaded rows into the cache: per stream, its snapshot if any, then its events
 * in version order. A refused snapshot only costs time: its stream is noted in
 * b->refold, to be folded from its first event, and its rows here are skipped. */
static bool fold_streams(struct batcher *b, PGresult *r)
{
	struct ledger_account *acc = NULL;
	const char *skip = NULL; /* the stream whose snapshot was refused */
	int folded = 0;          /* events folded into acc */
	char why[256];

	for (int row = 0; row < PQntuples(r); row++) {
		const char *stream = PQgetvalue(r, row, 0), *id = stream + strlen("account-");

		if (skip && strcmp(skip, stream) == 0)
			continue;
		if (!acc || strcmp(acc->id, id) != 0) {
			if (!note_catchup(b, acc, folded))
				return false;
			folded = 0;
			acc = account_new(id);
			if (!acc || !strmap_put(b->cache, id, acc)) {
				free(acc);
				return false;
			}
		}
		if (PQgetisnull(r, row, 2)) {
			if (restore_snapshot(r, row, acc, why, sizeof(why)))
				continue;
			log_warn(&b->ctx->log, "ignoring the snapshot of %s at version %s (%s); folding "
				 "the stream from its first event", stream, PQgetvalue(r, row, 1), why);
			strmap_remove(b->cache, id);
			acc = NULL;
			skip = stream;
			if (!strmap_put(b->refold, id, b))
				return false;
			continue;
		}
		if (!fold_event(r, row, acc)) {
			log_error(&b->ctx->log, "cannot fold stream %s at row %d", stream, row);
			strmap_remove(b->cache, id);
			return false;
		}
		folded++;
	}
	return note_catchup(b, acc, folded);
}

static struct slot *slot_of(struct batcher *b, const char *token_id, const char *key)
{
	for (size_t i = 0; i < b->nslots; i++)
		if (strcmp(b->slots[i].cmd->token_id, token_id) == 0 &&
		    strcmp(b->slots[i].cmd->idem_key, key) == 0)
			return &b->slots[i];
	return NULL;
}

/* Stored idempotency records decide their commands: replay, or refuse a reuse. */
static void apply_records(struct batcher *b, PGresult *r)
{
	for (int row = 0; row < PQntuples(r); row++) {
		struct slot *s = slot_of(b, PQgetvalue(r, row, 0), PQgetvalue(r, row, 1));
		if (!s)
			continue;
		if (strcmp(PQgetvalue(r, row, 2), s->cmd->idem_hash) != 0) {
			s->status = 422;
			s->body = http_problem_json(422, "idempotency_key_reused", "Idempotency key reused",
						    "this Idempotency-Key was used with a different request");
			s->headers = json_object();
			s->unrecorded = true;
			continue;
		}
		s->status = atoi(PQgetvalue(r, row, 3));
		s->headers = json_loads(PQgetvalue(r, row, 4), 0, NULL);
		s->body = json_loads(PQgetvalue(r, row, 5), 0, NULL);
		s->replay = true;
		s->last_event = -1;
	}
}

static void decide_all(struct batcher *b)
{
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
		fail_batch(b, 503, "loading account state failed; nothing was written, retry shortly");
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
	requeue_solo(b, FAIL_REFUSED, "an account's stream cannot be folded (see the log line "
				      "naming the stream)");
	start_batch(b);
}

static void load_done(void *arg, const struct pg_outcome *out)
{
	struct batcher *b = arg;
	PGresult *const *results = out->results;
	char why[256];

	if (out->status == PG_RUN_NOT_SENT || out->status == PG_RUN_UNKNOWN) {
		fail_batch(b, 503, "the event store became unreachable; nothing was written, retry shortly");
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
	if (b->q_streams >= 0 && !fold_streams(b, results[b->q_streams])) {
		fold_failed(b);
		return;
	}
	if (b->q_idem >= 0)
		apply_records(b, results[b->q_idem]);
	if (b->q_transfers >= 0)
		for (int row = 0; row < PQntuples(results[b->q_transfers]); row++)
			if (!strmap_put(b->transfers, PQgetvalue(results[b->q_transfers], row, 0), b))
				log_warn(&b->ctx->log, "out of memory noting transfer ids");
	decide_or_refold(b);
}

static void add_refold(void *arg, const char *id, void *value)
{
	char stream[LEDGER_ID_MAX + 16];

	(void)value;
	snprintf(stream, sizeof(stream), "account-%s", id);
	pg_array_append(arg, stream, evbuffer_get_length(arg) == 1);
}

/* Decide, once the streams whose snapshot was refused are folded from their first
 * event: one more load round, whose rows load_done folds like the first. */
static void decide_or_refold(struct batcher *b)
{
	struct evbuffer *buf;
	char *p[1] = { NULL };
	size_t len;

	if (strmap_count(b->refold) == 0) {
		decide_all(b);
		return;
	}
	buf = evbuffer_new();
	if (buf && evbuffer_add(buf, "{", 1) == 0) {
		strmap_foreach(b->refold, add_refold, buf);
		evbuffer_add(buf, "}", 2); /* with the NUL */
		len = evbuffer_get_length(buf);
		p[0] = malloc(len);
		if (p[0])
			evbuffer_remove(buf, p[0], len);
	}
	if (buf)
		evbuffer_free(buf);
	strmap_clear(b->refold);
	b->q_streams = 0;
	b->q_idem = b->q_transfers = -1;
	if (!queue_lookup(b, "load_streams_full", 1, p) || !pg_run(b->ctx->pg, load_done, b))
		fail_batch(b, 503, "the event store became unreachable; retry shortly");
}

/* Collect what the batch needs from the log; false when out of memory. */
struct needs {
	const char *accounts[2 * BATCH_MAX], *tokens[BATCH_MAX], *keys[BATCH_MAX],
		*transfers[BATCH_MAX];
	size_t naccounts, nkeys, ntransfers;
};

static void collect_needs(struct batcher *b, struct needs *nd)
{
	for (size_t i = 0; i < b->nslots; i++) {
		const struct cmd *cmd = b->slots[i].cmd;
		const char *ids[2];
		size_t n = cmd_accounts(cmd, ids);
		for (size_t j = 0; j < n; j++) {
			bool seen = strmap_get(b->cache, ids[j]) != NULL;
			for (size_t k = 0; !seen && k < nd->naccounts; k++)
				seen = strcmp(nd->accounts[k], ids[j]) == 0;
			if (!seen)
				nd->accounts[nd->naccounts++] = ids[j];
		}
		if (cmd->idem_key[0]) {
			nd->tokens[nd->nkeys] = cmd->token_id;
			nd->keys[nd->nkeys++] = cmd->idem_key;
		}
		if (cmd->kind == CMD_TRANSFER)
			nd->transfers[nd->ntransfers++] = cmd->u.transfer.id;
	}
}

/* Queue a lookup whose parameters were just built (and free them). */
static bool queue_lookup(struct batcher *b, const char *stmt, int nparams, char **params)
{
	bool ok = false;

	for (int i = 0; i < nparams; i++)
		if (!params[i])
			goto done;
	ok = pg_queue(b->ctx->pg, stmt, nparams, (const char *const *)params);
done:
	for (int i = 0; i < nparams; i++)
		free(params[i]);
	return ok;
}

/* Send the lookups the batch needs; *sent is false when it needs none. */
static bool load(struct batcher *b, bool *sent)
{
	struct needs *nd = calloc(1, sizeof(*nd));
	int queued = 0;
	bool ok = false;

	*sent = false;
	b->q_streams = b->q_idem = b->q_transfers = -1;
	if (!nd)
		return false;
	collect_needs(b, nd);
	if (nd->naccounts) {
		char *p[1] = { array_literal(nd->accounts, nd->naccounts, "account-") };
		if (!queue_lookup(b, "load_streams", 1, p))
			goto done;
		b->q_streams = queued++;
	}
	if (nd->nkeys) {
		char *p[2] = { array_literal(nd->tokens, nd->nkeys, ""),
			       array_literal(nd->keys, nd->nkeys, "") };
		if (!queue_lookup(b, "load_idem", 2, p))
			goto done;
		b->q_idem = queued++;
	}
	if (nd->ntransfers) {
		char *p[1] = { array_literal(nd->transfers, nd->ntransfers, "") };
		if (!queue_lookup(b, "load_transfers", 1, p))
			goto done;
		b->q_transfers = queued++;
	}
	if (queued && !pg_run(b->ctx->pg, load_done, b))
		goto done;
	*sent = queued > 0;
	ok = true;
done:
	free(nd);
	return ok;
}

static void start_batch(struct batcher *b)
{
	bool sent;

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
	if (!load(b, &sent)) {
		fail_batch(b, 503, "the event store became unreachable; retry shortly");
		return;
	}
	if (!sent)
		decide_all(b);
}
