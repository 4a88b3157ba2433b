/* daybook-admin status: the log's head, each projection's checkpoint and how far
 * behind the log it is, as a table or one JSON object. */
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin.h"
#include "cli.h"
#include "readmodel.h"

/* Below this many events (by the planner's estimate) the log is counted exactly. */
#define EXACT_COUNT_BELOW 1000000.0
#define ROWS_MAX 16

/* One projection: where it is and how far behind the log. */
struct row {
	char name[64];
	char token[48]; /* empty: no checkpoint */
	long long lag_events;
	double lag_seconds;
};

struct status {
	const struct log *log; /* the command's (admin_ctx) */
	PGconn *pg;
	long long events, max_position;
	bool exact;
	char head[48];
	struct row rows[ROWS_MAX]; /* the SQL projections */
	size_t nrows;
	bool redis_configured;
	char redis_error[256]; /* non-empty: Redis could not be read */
	bool redis_live;
	long long generation;
	struct row redis;
};

static PGresult *query(struct status *s, const char *sql, int nparams, const char *const *params)
{
	char pqline[1024];
	PGresult *r = PQexecParams(s->pg, sql, nparams, NULL, params, NULL, NULL, 0);

	if (PQresultStatus(r) == PGRES_TUPLES_OK)
		return r;
	log_error(s->log, "%s", log_oneline(PQresultErrorMessage(r), pqline, sizeof(pqline)));
	PQclear(r);
	return NULL;
}

static bool read_head(struct status *s)
{
	PGresult *r =
		query(s,
		      "SELECT coalesce(max(position), 0), coalesce((SELECT txid::text || '.' || "
		      "position FROM events ORDER BY txid DESC, position DESC LIMIT 1), '0.0'), "
		      "(SELECT reltuples FROM pg_class WHERE oid = 'events'::regclass) FROM events",
		      0, NULL);
	double estimate;

	if (!r)
		return false;
	s->max_position = atoll(PQgetvalue(r, 0, 0));
	snprintf(s->head, sizeof(s->head), "%s", PQgetvalue(r, 0, 1));
	estimate = atof(PQgetvalue(r, 0, 2));
	PQclear(r);
	/* reltuples is -1 before the first ANALYZE; a small log is counted exactly. */
	s->exact = estimate < EXACT_COUNT_BELOW;
	if (!s->exact) {
		s->events = (long long)estimate;
		return true;
	}
	if (!(r = query(s, "SELECT count(*) FROM events", 0, NULL)))
		return false;
	s->events = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return true;
}

/* Events after the token in reader order, and the age of the oldest of them. */
static bool read_lag(struct status *s, struct row *row)
{
	struct readmodel_position p = { 0, 0 };
	char txid[24], pos[24];
	const char *params[2] = { txid, pos };
	PGresult *r;

	if (row->token[0] && !readmodel_position_parse(row->token, &p)) {
		log_error(s->log, "%s: malformed checkpoint '%s'", row->name, row->token);
		return false;
	}
	snprintf(txid, sizeof(txid), "%llu", (unsigned long long)p.txid);
	snprintf(pos, sizeof(pos), "%llu", (unsigned long long)p.position);
	r = query(s,
		  "SELECT count(*), coalesce(greatest(extract(epoch FROM clock_timestamp() - "
		  "min(recorded_at)), 0), 0)::float8 FROM events "
		  "WHERE (txid, position) > ($1::xid8, $2::bigint)",
		  2, params);
	if (!r)
		return false;
	row->lag_events = atoll(PQgetvalue(r, 0, 0));
	row->lag_seconds = atof(PQgetvalue(r, 0, 1));
	PQclear(r);
	return true;
}

static bool read_projections(struct status *s)
{
	PGresult *r = query(s,
			    "SELECT projection, txid::text || '.' || position "
			    "FROM projection_checkpoints ORDER BY projection <> 'sql', projection",
			    0, NULL);

	if (!r)
		return false;
	for (int i = 0; i < PQntuples(r) && s->nrows < ROWS_MAX; i++) {
		struct row *row = &s->rows[s->nrows++];
		snprintf(row->name, sizeof(row->name), "%s", PQgetvalue(r, i, 0));
		snprintf(row->token, sizeof(row->token), "%s", PQgetvalue(r, i, 1));
		if (!read_lag(s, row))
			goto fail;
	}
	PQclear(r);
	return true;
fail:
	PQclear(r);
	return false;
}

/* Was generation gen built from this event store (its identity)? True when that
 * cannot be told: then the generation is shown as before identities. */
static bool live_is_ours(struct status *s, redisContext *c, const char *gen)
{
	PGresult *q = query(s, READMODEL_IDENTITY_SQL, 0, NULL);
	redisReply *id = NULL;
	char k[64];
	bool ours;

	readmodel_key_text(k, sizeof(k), gen, READMODEL_KIND_IDENTITY, NULL);
	if (q)
		id = redisCommand(c, "GET %s", k);
	ours = !q || !id || id->type == REDIS_REPLY_ERROR ||
	       (id->type == REDIS_REPLY_STRING && strcmp(id->str, PQgetvalue(q, 0, 0)) == 0);

	freeReplyObject(id);
	PQclear(q);
	return ours;
}

/* The live generation and its checkpoint; a Redis failure is reported, not fatal. */
static void read_redis(struct admin_ctx *ctx, struct status *s)
{
	redisContext *c = admin_redis_connect(&ctx->cfg.redis, s->redis_error,
					      sizeof(s->redis_error));
	redisReply *g = NULL, *cp = NULL;

	if (!c)
		return;
	g = redisCommand(c, "GET " READMODEL_LIVE_KEY);
	if (g && g->type == REDIS_REPLY_STRING && !live_is_ours(s, c, g->str)) {
		/* Readers do not use it: for them Redis holds no live model. */
		log_warn(s->log,
			 "redis generation %s was not built "
			 "from this event store: it is not used",
			 g->str);
	} else if (g && g->type == REDIS_REPLY_STRING) {
		s->redis_live = true;
		s->generation = atoll(g->str);
		char k[64];
		readmodel_key_text(k, sizeof(k), g->str, READMODEL_KIND_CHECKPOINT, NULL);
		cp = redisCommand(c, "GET %s", k);
	}
	if (!g || (s->redis_live && !cp))
		snprintf(s->redis_error, sizeof(s->redis_error), "%s", c->errstr);
	else if (g->type == REDIS_REPLY_ERROR || (cp && cp->type == REDIS_REPLY_ERROR))
		snprintf(s->redis_error, sizeof(s->redis_error), "%s",
			 g->type == REDIS_REPLY_ERROR ? g->str : cp->str);
	snprintf(s->redis.name, sizeof(s->redis.name), "redis");
	if (cp && cp->type == REDIS_REPLY_STRING)
		snprintf(s->redis.token, sizeof(s->redis.token), "%s", cp->str);
	if (g)
		freeReplyObject(g);
	if (cp)
		freeReplyObject(cp);
	redisFree(c);
}

/* --- output ------------------------------------------------------------------------------ */

/* {<key>: <value>, "checkpoint", "lag_events", "lag_seconds"}; value is stolen. */
static json_t *row_json(const char *key, json_t *value, const struct row *row)
{
	json_t *o = json_pack("{s:o}", key, value);

	json_object_set_new(o, "checkpoint", row->token[0] ? json_string(row->token) : json_null());
	json_object_set_new(o, "lag_events", json_integer(row->lag_events));
	json_object_set_new(o, "lag_seconds", json_real(row->lag_seconds));
	return o;
}

static json_t *redis_json(const struct status *s)
{
	if (!s->redis_configured)
		return json_null();
	if (s->redis_error[0])
		return json_pack("{s:s}", "error", s->redis_error);
	if (!s->redis_live)
		return json_pack("{s:n}", "live_generation");
	return row_json("live_generation", json_integer(s->generation), &s->redis);
}

static bool print_json(const struct status *s)
{
	json_t *projections = json_array(), *o;
	char *text;

	for (size_t i = 0; i < s->nrows; i++)
		json_array_append_new(projections,
				      row_json("name", json_string(s->rows[i].name), &s->rows[i]));
	o = json_pack("{s:{s:I, s:b, s:I, s:s}, s:o, s:o}", "log", "events", (json_int_t)s->events,
		      "events_exact", s->exact, "max_position", (json_int_t)s->max_position, "head",
		      s->head, "projections", projections, "redis", redis_json(s));
	/* Lags are measured in microseconds: ten significant digits print them without noise. */
	text = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(10)) : NULL;
	json_decref(o);
	if (text)
		puts(text);
	free(text);
	return text != NULL;
}

static void print_row(const char *name, const char *token, const char *lag_events,
		      const char *lag_seconds, int width)
{
	printf("%-*s  %-*s  %10s  %11s\n", 16, name, width, token, lag_events, lag_seconds);
}

static void print_projection(const struct row *row, const char *name, int width)
{
	char events[24], seconds[32];

	snprintf(events, sizeof(events), "%lld", row->lag_events);
	snprintf(seconds, sizeof(seconds), "%.3f", row->lag_seconds);
	print_row(name, row->token[0] ? row->token : "(none)", events, seconds, width);
}

static void print_redis(const struct status *s, int width)
{
	char name[48];

	if (!s->redis_configured) {
		print_row("redis", "(DAYBOOK_REDIS not set)", "-", "-", width);
	} else if (s->redis_error[0]) {
		printf("%-16s  unreachable: %s\n", "redis", s->redis_error);
	} else if (!s->redis_live) {
		print_row("redis", "(no live generation)", "-", "-", width);
	} else {
		snprintf(name, sizeof(name), "redis (gen %lld)", s->generation);
		print_projection(&s->redis, name, width);
	}
}

static void print_table(const struct status *s)
{
	int width = (int)strlen(s->head);
	char events[48];

	for (size_t i = 0; i < s->nrows; i++)
		if ((int)strlen(s->rows[i].token) > width)
			width = (int)strlen(s->rows[i].token);
	if ((int)strlen(s->redis.token) > width)
		width = (int)strlen(s->redis.token);
	if (width < 24)
		width = 24;
	snprintf(events, sizeof(events), "%s%lld events", s->exact ? "" : "~", s->events);
	print_row("", "POSITION", "LAG EVENTS", "LAG SECONDS", width);
	print_row("log head", s->head, "-", "-", width);
	for (size_t i = 0; i < s->nrows; i++)
		print_projection(&s->rows[i], s->rows[i].name, width);
	print_redis(s, width);
	printf("\nlog: %s, max position %lld\n", events, s->max_position);
}

/* --- the command --------------------------------------------------------------------------- */

/* Everything from one snapshot, so the head and the checkpoints agree. */
static bool read_all(struct admin_ctx *ctx, struct status *s)
{
	PGresult *r = PQexec(s->pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
	bool ok = false;

	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		goto done;
	if (!read_head(s) || !read_projections(s))
		goto done;
	if (s->redis_configured) {
		read_redis(ctx, s);
		if (!s->redis_error[0] && s->redis_live && !read_lag(s, &s->redis))
			goto done;
	}
	ok = true;
done:
	PQclear(r);
	PQclear(PQexec(s->pg, "COMMIT"));
	return ok;
}

int admin_status(struct admin_ctx *ctx, int argc, char **argv)
{
	static const struct option options[] = {
		{ "json", no_argument, NULL, 'j' },
		CLI_COMMON_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	struct status s = { .log = &ctx->log };
	bool json = false;
	char line[1024];
	int rc = CLI_EXIT_UNAVAILABLE, c;

	while ((c = getopt_long(argc, argv, "+:h", options, NULL)) != -1) {
		switch (c) {
		case 'j':
			json = true;
			break;
		case 'h':
			return admin_help("status");
		default:
			return admin_getopt_error("status", argc, argv, c);
		}
	}
	if (optind < argc)
		return admin_usage_error("status", "unexpected argument '%s'", argv[optind]);
	if (!admin_configure(ctx, "status"))
		return CLI_EXIT_USAGE;
	s.redis_configured = ctx->cfg.redis_url != NULL;
	s.pg = PQconnectdb(ctx->cfg.pg);
	if (PQstatus(s.pg) != CONNECTION_OK) {
		log_error(s.log, "cannot connect to PostgreSQL: %s",
			  log_oneline(PQerrorMessage(s.pg), line, sizeof(line)));
		goto done;
	}
	if (!admin_event_store_usable(s.pg, s.log)) {
		rc = EVENTSTORE_EXIT_UNUSABLE;
		goto done;
	}
	if (!read_all(ctx, &s))
		goto done;
	if (json) {
		rc = print_json(&s) ? 0 : 1;
	} else {
		print_table(&s);
		rc = 0;
	}
done:
	PQfinish(s.pg);
	return rc;
}
