/* daybook-query's time travel (SPEC §4.2): an account, or its statement, as it was at
 * a position token (`as_of`) or a time (`at`), folded from the event store with the
 * domain's own ledger_evolve, starting from the newest usable snapshot before that
 * point (docs/query-api.md, "Time travel").
 *
 * Only stable answers are given: the same request gives the same answer later.
 *  - as_of=<txid>.<position> is answered once its txid is below the readable horizon
 *    pg_snapshot_xmin(pg_current_snapshot()): no transaction at or below it is still
 *    running, so no event at or before the token can appear later. Until then the read
 *    waits in the waiting room for the log's readable head, like min_position.
 *  - at=<time> is answered once the time has passed and every transaction that was
 *    running when it had passed (pg_snapshot_xip of a snapshot taken after it) has
 *    ended: any transaction that records an event later got its transaction id later,
 *    so it records it after that time. Until then the read looks again, every few
 *    milliseconds, up to wait_ms. */
#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "ledger_json.h"
#include "query.h"

#define LOG_HEAD QUERY_SQL_LOG_HEAD
#define POLL_FIRST_MS 2
#define POLL_MAX_MS 50
#define AT_CLOCK_SLACK_S 1.0
#define PG_EPOCH_UNIX 946684800.0 /* 2000-01-01T00:00:00Z, PostgreSQL's epoch */

/* Parameters: $1 the stream, $2 and $3 the point (as_of: txid, position; at: the time,
 * and the transaction that must have ended, '0' until known), $4 the statement's limit
 * (0: the account), $5 before (0: none), $6 the highest snapshot version that may be
 * used (below a refused one).
 *
 * The point's version v is found by a binary search over the stream's versions (b:
 * lo is at or before the point, or 0, everything above hi is after it), one index
 * probe per step: about 20 for a stream of 1,000,000 events. It relies on what the
 * projector relies on too: within a stream, reader order is version order, and
 * recorded_at grows with the version. The fold then starts from the newest snapshot at
 * or below `lo` (s), whose state the caller checks: just below v for the account (its
 * last event gives updated_at), below the page's oldest possible item for a statement
 * page (a page of `limit` items plus one to tell whether there is a next page spans at
 * most limit + 3 versions: only AccountOpened and AccountClosed make no item).
 *
 * Columns: 0, 1 the log head; 2 readable; 3 the point has passed; 4 the newest running
 * transaction; 5 v (NULL: no account at the point); 6 top (the newest version the page
 * may show); 7, 8 the snapshot's version and state; 9 name; 10 opened_at; 11-14 the
 * events after the snapshot up to top (version, type, data, recorded_at), one a row;
 * recorded_at only above lo, where it is used (the account's last event, the page). */
#define TT_SQL(POINT, READABLE, PASSED)                                                                                                             \
	"WITH RECURSIVE x AS (SELECT pg_current_snapshot() AS snap, statement_timestamp() AS now),"                                                 \
	" r AS (SELECT " READABLE " AS ok, " PASSED " AS passed,"                                                                                   \
	" (SELECT i FROM pg_snapshot_xip(x.snap) i ORDER BY i DESC LIMIT 1) AS inflight FROM x),"                                                   \
	" b AS (SELECT 0::bigint AS lo, CASE WHEN r.ok THEN coalesce((SELECT max(version)"                                                          \
	" FROM events WHERE stream = $1), 0) ELSE 0 END::bigint AS hi FROM r"                                                                       \
	" UNION ALL SELECT CASE WHEN c.ok THEN c.mid ELSE b.lo END,"                                                                                \
	" CASE WHEN c.ok THEN b.hi ELSE c.mid - 1 END FROM b CROSS JOIN LATERAL"                                                                    \
	" (SELECT (b.lo + b.hi + 1) / 2 AS mid, EXISTS (SELECT FROM events e WHERE e.stream = $1"                                                   \
	" AND e.version = (b.lo + b.hi + 1) / 2 AND " POINT(                                                                                        \
		"e") ") AS ok) c WHERE b.lo < b.hi),"                                                                                               \
		     " v AS (SELECT nullif(b.lo, 0) AS v FROM b WHERE b.lo >= b.hi),"                                                               \
		     " t AS (SELECT v.v, CASE WHEN $5::integer > 0 THEN least(v.v, $5::integer - 1)"                                                \
		     " ELSE v.v END AS top FROM v),"                                                                                                \
		     " l AS (SELECT t.v, t.top, CASE WHEN $4::integer = 0 THEN t.top - 1"                                                           \
		     " ELSE t.top - $4::integer - 4 END AS lo FROM t),"                                                                             \
		     " s AS (SELECT a.version, a.state::text AS state FROM account_snapshots a"                                                     \
		     " WHERE a.stream = $1 AND a.version <= least((SELECT lo FROM l), $6::integer)"                                                 \
		     " ORDER BY a.version DESC LIMIT 1)"                                                                                            \
		     " SELECT coalesce(h.txid::text, '0'), coalesce(h.position, 0), r.ok, r.passed,"                                                \
		     " r.inflight::text, l.v, l.top, s.version, s.state, o.data ->> 'name',"                                                        \
		     " " READMODEL_SQL_TIME(                                                                                                        \
			     "o.recorded_at") ", e.version, e.type, e.data::text, e.at"                                                             \
					      " FROM r CROSS JOIN l LEFT JOIN LATERAL (" LOG_HEAD                                                   \
					      ") h ON true LEFT JOIN s ON true"                                                                     \
					      " LEFT JOIN events o ON l.v IS NOT NULL AND o.stream = $1 AND o.version = 1"                          \
					      " LEFT JOIN LATERAL (SELECT version, type, data, CASE WHEN version > l.lo THEN"                       \
					      " " READMODEL_SQL_TIME(                                                                               \
						      "recorded_at") " END AS at FROM events"                                                       \
								     " WHERE stream = $1 AND version > coalesce(s.version, 0) AND version <= l.top" \
								     " ORDER BY version) e ON true ORDER BY e.version"

#define AS_OF_POINT(e) "(" e ".txid, " e ".position) <= ($2::xid8, $3::bigint)"
#define AT_POINT(e) e ".recorded_at <= $2::timestamptz"

static const char timetravel_sql_as_of[] = TT_SQL(AS_OF_POINT,
						  "$2::xid8 < pg_snapshot_xmin(x.snap)", "true");
static const char timetravel_sql_at[] =
	TT_SQL(AT_POINT,
	       "$2::timestamptz < x.now AND (NOT EXISTS (SELECT FROM pg_snapshot_xip(x.snap))"
	       " OR ($3::xid8 <> '0'::xid8 AND pg_snapshot_xmin(x.snap) > $3::xid8))",
	       "$2::timestamptz < x.now");

enum col {
	C_HEAD_TXID,
	C_HEAD_POS,
	C_OK,
	C_PASSED,
	C_INFLIGHT,
	C_V,
	C_TOP,
	C_SNAP_VERSION,
	C_SNAP_STATE,
	C_NAME,
	C_OPENED_AT,
	C_E_VERSION,
	C_E_TYPE,
	C_E_DATA,
	C_E_AT,
	C_COUNT,
};

/* --- parameters ------------------------------------------------------------------ */

int timetravel_params(struct http_request *req, struct read *rd)
{
	const char *as_of = http_query(req, "as_of"), *at = http_query(req, "at");
	int64_t micros;

	if (!as_of && !at)
		return 0;
	if (as_of && at) {
		http_reply_invalid(req, "query parameters 'as_of' and 'at' cannot be combined: "
					"give one point");
		return -1;
	}
	if (rd->has_min) {
		http_reply_invalid(
			req,
			as_of ? "query parameter 'as_of' cannot be combined with min_position: an as_of "
				"read waits until its own point is readable"
			      : "query parameter 'at' cannot be combined with min_position: an at read "
				"waits until every event up to its time is readable");
		return -1;
	}
	rd->tt.statement = rd->kind == READ_TRANSACTIONS;
	snprintf(rd->tt.inflight, sizeof(rd->tt.inflight), "0");
	rd->tt.poll_ms = POLL_FIRST_MS;
	rd->tt.snapshots_below = INT32_MAX;
	if (as_of) {
		/* The position is a bigint in the statement (as in the feed's tokens): one
		 * beyond it would fail the statement, and with it the reads pipelined
		 * behind it in the same batch. */
		if (!readmodel_position_parse(as_of, &rd->tt.as_of) ||
		    rd->tt.as_of.position > (uint64_t)INT64_MAX) {
			http_reply_invalid(req, "query parameter 'as_of' must be a position token "
						"\"<txid>.<position>\" as returned by a write");
			return -1;
		}
		rd->kind = READ_TT_AS_OF;
		rd->min = rd->tt.as_of; /* what a wait waits for */
		return 1;
	}
	if (!readmodel_time_parse(at, &micros)) {
		http_reply_invalid(req, "query parameter 'at' must be an RFC 3339 date-time, e.g. "
					"2026-01-31T23:59:59Z (encode '+' as %2B)");
		return -1;
	}
	readmodel_time_text(micros, rd->tt.at); /* PostgreSQL reads it as a timestamptz */
	/* A time further ahead than the read may wait cannot become stable in time: 503
	 * now, rather than a look at the event store every POLL_MAX_MS until the deadline
	 * (which many such reads would turn into a load on the SQL pool that every
	 * fallback read shares). AT_CLOCK_SLACK_S allows for this host's clock being
	 * ahead of PostgreSQL's, whose clock decides. */
	{
		struct timespec rt;
		double ahead;

		clock_gettime(CLOCK_REALTIME, &rt);
		ahead = (double)micros / 1e6 + PG_EPOCH_UNIX -
			((double)rt.tv_sec + (double)rt.tv_nsec / 1e9);
		if (ahead > rd->deadline - mono_now() + AT_CLOCK_SLACK_S) {
			char retry[24];
			snprintf(retry, sizeof(retry), "%.0f", ahead < 1 ? 1 : ahead + 0.5);
			http_set_header(req, "Retry-After", retry);
			http_reply_problem(req, 503, "projection_behind", "Projection behind",
					   "%s is %.0f s ahead: not every event recorded at or "
					   "before it can be readable within wait_ms",
					   rd->tt.at, ahead);
			return -1;
		}
	}
	rd->kind = READ_TT_AT;
	return 1;
}

static int timetravel_sql_params(const struct read *rd, char buf[][80], const char **values)
{
	snprintf(buf[0], 80, "account-%s", rd->id);
	if (rd->kind == READ_TT_AS_OF) {
		snprintf(buf[1], 80, "%" PRIu64, rd->tt.as_of.txid);
		snprintf(buf[2], 80, "%" PRIu64, rd->tt.as_of.position);
	} else {
		snprintf(buf[1], 80, "%s", rd->tt.at);
		snprintf(buf[2], 80, "%s", rd->tt.inflight);
	}
	snprintf(buf[3], 80, "%d", rd->tt.statement ? rd->limit : 0);
	snprintf(buf[4], 80, "%d", rd->tt.statement ? rd->before : 0);
	snprintf(buf[5], 80, "%" PRId32, rd->tt.snapshots_below);
	for (int i = 0; i < TIMETRAVEL_PARAMS; i++)
		values[i] = buf[i];
	return TIMETRAVEL_PARAMS;
}

/* --- answers --------------------------------------------------------------------- */

static void reply_not_stable(struct read *rd)
{
	http_reply_problem(rd->req, 503, "projection_behind", "Projection behind",
			   "not every event recorded at or before %s is readable yet (the time "
			   "has not passed, or a write that may hold one is still running)",
			   rd->tt.at);
	read_finish(rd);
}

static void on_poll(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	read_start(arg);
}

/* The point is not readable yet: wait for it, or give up at the deadline. */
static void not_yet(struct read *rd, const PGresult *res)
{
	struct timeval tv;

	if (rd->kind == READ_TT_AS_OF) {
		read_wait(rd); /* the waiting room: the log's head reaching the token */
		return;
	}
	/* The first look after the time has passed names the transactions that must end. */
	if (strcmp(rd->tt.inflight, "0") == 0 && strcmp(PQgetvalue(res, 0, C_PASSED), "t") == 0 &&
	    !PQgetisnull(res, 0, C_INFLIGHT))
		snprintf(rd->tt.inflight, sizeof(rd->tt.inflight), "%s",
			 PQgetvalue(res, 0, C_INFLIGHT));
	if (mono_now() + rd->tt.poll_ms / 1e3 >= rd->deadline) {
		reply_not_stable(rd);
		return;
	}
	tv = (struct timeval){ .tv_sec = 0, .tv_usec = rd->tt.poll_ms * 1000 };
	if (event_base_once(rd->ctx->base, -1, EV_TIMEOUT, on_poll, rd, &tv) != 0) {
		reply_not_stable(rd);
		return;
	}
	rd->tt.poll_ms = rd->tt.poll_ms * 2 > POLL_MAX_MS ? POLL_MAX_MS : rd->tt.poll_ms * 2;
}

/* The fold of one result: the account at the point, and the statement items
 * (rendered, oldest first) of the versions above `lo`. */
struct fold {
	struct readmodel_row row; /* the shared fold's; its name is not used (see account_body) */
	const char *updated_at;
	char **items;
	size_t *lens;
	size_t n, cap;
};

static void fold_free(struct fold *f)
{
	for (size_t i = 0; i < f->n; i++)
		free(f->items[i]);
	free(f->items);
	free(f->lens);
}

static bool add_item(struct fold *f, const struct ledger_event *ev, const char *at)
{
	struct readmodel_entry e = readmodel_entry_of(&f->row, ev, at);
	char *json;

	if (f->n == f->cap) {
		size_t cap = f->cap ? 2 * f->cap : 64;
		char **items = realloc(f->items, cap * sizeof(*items));
		size_t *lens;
		if (!items)
			return false;
		f->items = items;
		if (!(lens = realloc(f->lens, cap * sizeof(*lens))))
			return false;
		f->lens = lens;
		f->cap = cap;
	}
	if (!(json = readmodel_entry_json(&e)))
		return false;
	f->items[f->n] = json;
	f->lens[f->n++] = strlen(json);
	return true;
}

/* Start from the snapshot, checked like the command service checks it (it decodes
 * into a plausible account of this stream at its version); false when refused, with
 * the reason in why. */
static bool restore(const struct read *rd, const PGresult *res, struct ledger_account *acc,
		    char *why, size_t whylen)
{
	return ledger_snapshot_from_text(PQgetvalue(res, 0, C_SNAP_STATE), rd->id,
					 (int32_t)atoi(PQgetvalue(res, 0, C_SNAP_VERSION)), acc,
					 why, whylen);
}

/* Fold one event row into f (and its statement item, above lo); false when it does
 * not follow or does not apply. */
static bool fold_row(const struct read *rd, const PGresult *res, int row, int32_t lo,
		     struct ledger_event_buf *buf, struct fold *f)
{
	enum ledger_event_type type = ledger_event_type_from_name(PQgetvalue(res, row, C_E_TYPE));
	int32_t version = (int32_t)atol(PQgetvalue(res, row, C_E_VERSION));
	const char *at = PQgetvalue(res, row, C_E_AT); /* "" at or below lo */
	struct ledger_event ev;
	struct readmodel_change change;

	if (!type || version != f->row.acc.version + 1)
		return false;
	if (!ledger_event_from_text(type, PQgetvalue(res, row, C_E_DATA),
				    (size_t)PQgetlength(res, row, C_E_DATA), buf, &ev))
		return false;
	if (!readmodel_fold(&f->row, rd->id, version, &ev, &change))
		return false;
	f->updated_at = at;
	if (rd->tt.statement && version > lo && change.entry_type)
		return add_item(f, &ev, at);
	return true;
}

/* Fold the rows' events into f; false when one does not follow or apply. */
static bool fold_events(const struct read *rd, const PGresult *res, int32_t lo, struct fold *f)
{
	struct ledger_event_buf buf = { 0 };
	bool ok = true;

	for (int row = 0; row < PQntuples(res) && !PQgetisnull(res, row, C_E_VERSION); row++) {
		if (!fold_row(rd, res, row, lo, &buf, f)) {
			ok = false;
			break;
		}
	}
	ledger_event_buf_free(&buf);
	return ok;
}

static void reply_fold_failed(struct read *rd, const char *what)
{
	log_error(&rd->ctx->log, "time travel: cannot fold account-%s: %s", rd->id, what);
	http_reply_problem(rd->req, 500, "internal", "Internal error",
			   "the event store's events of this account could not be folded");
	read_finish(rd);
}

/* The account's body at the point; NULL when out of memory. Caller frees. */
static char *account_body(const PGresult *res, const struct read *rd, const struct fold *f)
{
	struct readmodel_account a = readmodel_account_of(&f->row, PQgetvalue(res, 0, C_OPENED_AT),
							  f->updated_at);

	/* A fold from a snapshot does not see AccountOpened: the name comes from the log. */
	a.account_id = rd->id;
	a.name = PQgetvalue(res, 0, C_NAME);

	return readmodel_account_json(&a);
}

/* The statement page: the newest `limit` items, newest first, and the next page when
 * there are more. NULL when out of memory; caller frees. */
static char *statement_body(const struct read *rd, const struct fold *f, size_t *len)
{
	size_t n = f->n < (size_t)rd->limit ? f->n : (size_t)rd->limit;
	const char **items = malloc((n ? n : 1) * sizeof(*items));
	size_t *lens = malloc((n ? n : 1) * sizeof(*lens));
	char next[24], *body = NULL;

	if (!items || !lens)
		goto done;
	for (size_t i = 0; i < n; i++) {
		items[i] = f->items[f->n - 1 - i];
		lens[i] = f->lens[f->n - 1 - i];
	}
	if (n && f->n > n)
		snprintf(next, sizeof(next), "%lld", readmodel_item_version(f->items[f->n - n]));
	body = transactions_body(items, lens, n, n && f->n > n ? next : NULL, len);
done:
	free(items);
	free(lens);
	return body;
}

static void answer(struct read *rd, const PGresult *res, const struct readmodel_position *head)
{
	int32_t top = (int32_t)atol(PQgetvalue(res, 0, C_TOP));
	int32_t lo = rd->tt.statement ? top - rd->limit - 4 : top - 1; /* as in TT_SQL */
	struct fold f = { 0 };
	char why[256], etag[16], *body;
	size_t len = 0;

	if (!PQgetisnull(res, 0, C_SNAP_VERSION) &&
	    !restore(rd, res, &f.row.acc, why, sizeof(why))) {
		log_warn(&rd->ctx->log,
			 "ignoring the snapshot of account-%s at version %s (%s); "
			 "folding from an older one, or from the first event",
			 rd->id, PQgetvalue(res, 0, C_SNAP_VERSION), why);
		rd->tt.snapshots_below = (int32_t)atol(PQgetvalue(res, 0, C_SNAP_VERSION)) - 1;
		read_start(rd);
		return;
	}
	if (PQgetisnull(res, 0, C_NAME) || !fold_events(rd, res, lo, &f)) {
		reply_fold_failed(rd, "an event does not follow or does not apply");
		goto done;
	}
	if (!rd->tt.statement && (f.row.acc.version != top || !f.updated_at)) {
		reply_fold_failed(rd, "the fold ended before the point's version");
		goto done;
	}
	snprintf(etag, sizeof(etag), "%" PRId32, f.row.acc.version);
	body = rd->tt.statement ? statement_body(rd, &f, &len) : account_body(res, rd, &f);
	if (!body) {
		http_reply_problem(rd->req, 503, "unavailable", "Service unavailable",
				   "out of memory");
		read_finish(rd);
		goto done;
	}
	if (!rd->tt.statement)
		len = strlen(body);
	read_reply_body(rd, head, body, len, rd->tt.statement ? NULL : etag);
	free(body);
done:
	fold_free(&f);
}

static void timetravel_done(struct read *rd, const PGresult *res)
{
	char text[QUERY_POSITION_MAX];
	struct readmodel_position head;

	if (PQntuples(res) < 1 || PQnfields(res) != C_COUNT) {
		reply_fold_failed(rd, "unexpected result shape");
		return;
	}
	snprintf(text, sizeof(text), "%s.%s", PQgetvalue(res, 0, C_HEAD_TXID),
		 PQgetvalue(res, 0, C_HEAD_POS));
	if (!readmodel_position_parse(text, &head)) {
		reply_fold_failed(rd, "unexpected log head");
		return;
	}
	if (strcmp(PQgetvalue(res, 0, C_OK), "t") != 0) {
		not_yet(rd, res);
		return;
	}
	if (PQgetisnull(res, 0, C_V)) {
		read_reply_not_found(rd, &head);
		return;
	}
	answer(rd, res, &head);
}

_Static_assert(TIMETRAVEL_PARAMS <= SQLPOOL_PARAMS_MAX, "the SQL pool's parameter slots");

const struct sqlpool_kind timetravel_kinds[TIMETRAVEL_NKINDS] = {
	{ READ_TT_AS_OF,
	  { "tt_as_of", timetravel_sql_as_of },
	  timetravel_sql_params,
	  timetravel_done },
	{ READ_TT_AT, { "tt_at", timetravel_sql_at }, timetravel_sql_params, timetravel_done },
};
