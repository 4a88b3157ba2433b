/* daybook-query's routes: parse and validate a read request, then start it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "query.h"

#define WAIT_MS_DEFAULT 1000
#define WAIT_MS_MAX 10000

/* A decimal integer in [min, max], digits only; false when absent-but-empty or
 * malformed. */
static bool parse_int(const char *s, long min, long max, int *out)
{
	long v = 0;
	size_t n = 0;

	for (; s[n]; n++) {
		if (s[n] < '0' || s[n] > '9' || n >= 10)
			return false;
		v = v * 10 + (s[n] - '0');
	}
	if (n == 0 || v < min || v > max)
		return false;
	*out = (int)v;
	return true;
}

/* An optional integer query parameter; false after replying 400 naming it. */
static bool int_param(struct http_request *req, const char *name, long min, long max, int *out)
{
	const char *v = http_query(req, name);

	if (!v || parse_int(v, min, max, out))
		return true;
	http_reply_problem(req, 400, "invalid_request", "Invalid request",
			   "query parameter '%s' must be an integer from %ld to %ld", name, min,
			   max);
	return false;
}

/* Read-your-writes: min_position (or X-Daybook-Min-Position) and wait_ms. */
static bool consistency_params(struct http_request *req, struct read *rd)
{
	const char *min = http_query(req, "min_position");
	const char *via = "query parameter 'min_position'";
	int wait_ms = WAIT_MS_DEFAULT;

	if (!min) {
		min = http_header(req, "X-Daybook-Min-Position");
		via = "header 'X-Daybook-Min-Position'";
	}
	if (min && !readmodel_position_parse(min, &rd->min)) {
		http_reply_problem(
			req, 400, "invalid_request", "Invalid request",
			"%s must be a position token \"<txid>.<position>\" as returned by a write",
			via);
		return false;
	}
	rd->has_min = min != NULL;
	if (!int_param(req, "wait_ms", 0, WAIT_MS_MAX, &wait_ms))
		return false;
	rd->deadline = mono_now() + wait_ms / 1e3;
	return true;
}

/* A read of `kind` with its common parameters; NULL after replying. */
static struct read *read_new(struct http_request *req, void *arg, enum read_kind kind, bool has_id)
{
	struct read *rd = calloc(1, sizeof(*rd));

	if (!rd) {
		http_reply_problem(req, 503, "unavailable", "Service unavailable", "out of memory");
		return NULL;
	}
	rd->ctx = arg;
	rd->req = req;
	rd->kind = kind;
	if (has_id && !ledger_valid_id(http_param(req, 0))) {
		http_reply_invalid(
			req,
			kind == READ_TRANSFER
				? "the transfer id in the path must be 1-64 characters of [A-Za-z0-9._:-]"
				: "the account id in the path must be 1-64 characters of [A-Za-z0-9._:-]");
		goto fail;
	}
	if (has_id)
		strcpy(rd->id, http_param(req, 0));
	if (!consistency_params(req, rd))
		goto fail;
	return rd;
fail:
	free(rd);
	return NULL;
}

static void get_account(struct http_request *req, void *arg)
{
	struct read *rd = read_new(req, arg, READ_ACCOUNT, true);

	if (!rd)
		return;
	if (timetravel_params(req, rd) < 0) { /* as_of or at: folded from the log */
		free(rd);
		return;
	}
	read_start(rd);
}

static void get_transactions(struct http_request *req, void *arg)
{
	struct read *rd = read_new(req, arg, READ_TRANSACTIONS, true);

	if (!rd)
		return;
	rd->limit = 50;
	if (!int_param(req, "limit", 1, 500, &rd->limit) ||
	    !int_param(req, "before", 1, 2147483647, &rd->before) ||
	    timetravel_params(req, rd) < 0) {
		free(rd);
		return;
	}
	read_start(rd);
}

static void get_transfer(struct http_request *req, void *arg)
{
	struct read *rd = read_new(req, arg, READ_TRANSFER, true);

	if (rd)
		read_start(rd);
}

static void get_totals(struct http_request *req, void *arg)
{
	struct read *rd = read_new(req, arg, READ_TOTALS, false);

	if (rd)
		read_start(rd);
}

static void get_events(struct http_request *req, void *arg)
{
	struct read *rd = read_new(req, arg, READ_EVENTS, true);

	if (!rd)
		return;
	rd->limit = 100;
	if (!int_param(req, "after_version", 0, 2147483647, &rd->after_version) ||
	    !int_param(req, "limit", 1, 1000, &rd->limit)) {
		free(rd);
		return;
	}
	read_start(rd);
}

/* Every read takes min_position and wait_ms (consistency_params). */
#define CONSISTENCY "min_position wait_ms"

const struct http_route query_routes[] = {
	{ "GET", "/accounts/*", "/accounts/{id}", SCOPE_READ, get_account,
	  CONSISTENCY " as_of at" },
	{ "GET", "/accounts/*/transactions", "/accounts/{id}/transactions", SCOPE_READ,
	  get_transactions, CONSISTENCY " limit before as_of at" },
	{ "GET", "/accounts/*/events", "/accounts/{id}/events", SCOPE_READ, get_events,
	  CONSISTENCY " after_version limit" },
	{ "GET", "/transfers/*", "/transfers/{id}", SCOPE_READ, get_transfer, CONSISTENCY },
	{ "GET", "/totals", "/totals", SCOPE_READ, get_totals, CONSISTENCY },
	{ "GET", "/events", "/events", SCOPE_READ, feed_get_events,
	  "after limit wait_ms type stream" },
	{ "GET", "/events/stream", "/events/stream", SCOPE_READ, feed_get_stream,
	  "after type stream" },
};
const size_t query_nroutes = sizeof(query_routes) / sizeof(query_routes[0]);
