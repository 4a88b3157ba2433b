/* PostgreSQL on the event loop: one non-blocking libpq connection in pipeline mode,
 * reconnecting by itself, plus small helpers shared with the blocking admin tool. */
#ifndef DAYBOOK_PG_H
#define DAYBOOK_PG_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

struct event_base;
struct evbuffer;
struct pg;

/* A statement prepared on every (re)connection, used by name with pg_queue. */
struct pg_statement {
	const char *name;
	const char *sql;
};

struct pg_config {
	const char *conninfo;
	const char *application_name;
	struct event_base *base;
	const struct log *log;
	const struct pg_statement *statements;
	size_t nstatements;
	const char *listen_channel; /* LISTEN on it after connecting; NULL for none */
	double run_timeout;         /* seconds before a pipeline run counts as lost; 0: 10 s */
	/* Server-side deadlines set on every connection (statement_timeout and
	 * idle_in_transaction_session_timeout), in milliseconds; 0 leaves the server's.
	 * Keep it below run_timeout, so that PostgreSQL itself ends a slow run (and
	 * reports it) before the client gives up on it. */
	int statement_timeout_ms;
	/* Commit without waiting for the WAL flush. Only for derived data that a crash may
	 * roll back consistently (the projector): never for acknowledged writes. */
	bool async_commit;
	/* Plan every prepared statement once (plan_cache_mode = force_generic_plan): for a
	 * session whose statements are run many times with plans that do not depend on
	 * their parameters' values (the projector's). */
	bool generic_plans;
	void (*on_connect)(void *arg);
	void (*on_notify)(void *arg);
	void *arg;
};

/* Start connecting in the background; reconnects with backoff whenever the connection
 * is lost. The config's pointers must outlive the connection. Close with pg_close. */
int pg_open(struct pg **out, const struct pg_config *cfg) __attribute__((warn_unused_result));
void pg_close(struct pg **pg);

/* Connected, set up, and no pipeline run in progress: pg_queue may be called. */
bool pg_ready(const struct pg *pg);
bool pg_connected(const struct pg *pg);
/* The last connection error, for /readyz and logs ("" when none). */
const char *pg_last_error(const struct pg *pg);
/* The server process id of the current session (0 while not connected). */
int pg_backend_pid(const struct pg *pg);

/* How a run ended, as far as PostgreSQL's verdict on its transaction is known. */
enum pg_run_status {
	/* The sync's answer arrived and the implicit COMMIT succeeded, unless a statement
	 * failed (then everything was rolled back): check each result. */
	PG_RUN_DONE,
	/* Every statement succeeded, but the transaction failed at COMMIT (a deferred
	 * constraint, a serialization failure, a full NOTIFY queue): nothing committed. */
	PG_RUN_COMMIT_FAILED,
	/* The connection failed before the run's sync left this process: nothing can
	 * have committed. */
	PG_RUN_NOT_SENT,
	/* The connection failed, or the run outlived run_timeout, after the sync was
	 * sent: it may or may not have committed. A timed-out run is cancelled and its
	 * connection dropped before the callback runs, so it cannot commit later. */
	PG_RUN_UNKNOWN,
};

/* What a run's callback receives; everything in it is valid only during the call. */
struct pg_outcome {
	enum pg_run_status status;
	/* results[i] is the result of the i-th queued statement: PGRES_COMMAND_OK /
	 * PGRES_TUPLES_OK, PGRES_FATAL_ERROR, or PGRES_PIPELINE_ABORTED for those after a
	 * failed one. n is 0 when the run did not complete (NOT_SENT, UNKNOWN). */
	PGresult *const *results;
	size_t n;
	/* The error PostgreSQL raised at COMMIT (COMMIT_FAILED only), else NULL. */
	const PGresult *commit_error;
	/* Why the run failed (every status but DONE), else NULL. */
	const char *error;
};

/* Called once per run. Callers must treat every status but PG_RUN_DONE as failure,
 * and check the results' statuses on PG_RUN_DONE too (pg_outcome_ok does both). */
typedef void (*pg_done_cb)(void *arg, const struct pg_outcome *out);

/* True when the run committed (or, for reads, answered) with every statement
 * successful; otherwise false with a one-line reason in why. */
bool pg_outcome_ok(const struct pg_outcome *out, char *why, size_t whylen)
	__attribute__((warn_unused_result));
/* The one non-NULL value of a run of one statement that gave one row of one column
 * (a single lookup such as the store's identity), or NULL for any other outcome. It
 * lives in the outcome's result. */
const char *pg_outcome_value(const struct pg_outcome *out);

/* Queue a prepared statement (by name) or SQL text with text parameters. Only while
 * pg_ready (or while queueing a run that has not been started). False when libpq
 * refused it (the connection is then being reset). */
bool pg_queue(struct pg *pg, const char *statement, int nparams, const char *const *values)
	__attribute__((warn_unused_result));
bool pg_queue_sql(struct pg *pg, const char *sql, int nparams, const char *const *values)
	__attribute__((warn_unused_result));
/* pg_queue with parameters in either format: formats[i] 1 sends values[i] as
 * lengths[i] bytes of PostgreSQL's binary form (pg_bin_array), 0 as text (lengths and
 * formats may be NULL: all text); binary_results asks for every column in binary. */
bool pg_queue_params(struct pg *pg, const char *statement, int nparams, const char *const *values,
		     const int *lengths, const int *formats, bool binary_results)
	__attribute__((warn_unused_result));
/* Send the queued statements with one sync; `done` gets their results. */
bool pg_run(struct pg *pg, pg_done_cb done, void *arg) __attribute__((warn_unused_result));

/* Append a PostgreSQL array literal element (quoted, escaped; NULL for a NULL value)
 * to buf: call between evbuffer_add(buf, "{", 1) and evbuffer_add(buf, "}", 1), with
 * `first` set for the first element. */
void pg_array_append(struct evbuffer *buf, const char *value, bool first);

/* A one-dimensional array parameter in PostgreSQL's binary form (array_recv's),
 * built element by element: no text to parse on the server, and binary elements (an
 * int8, a timestamptz) skip their types' text input too. */
enum pg_type_oid { /* pg_type's OIDs, fixed for built-in types */
		   PG_TYPE_BOOL = 16,
		   PG_TYPE_INT8 = 20,
		   PG_TYPE_INT4 = 23,
		   PG_TYPE_TEXT = 25,
		   PG_TYPE_TIMESTAMPTZ = 1184, /* int8: microseconds since 2000-01-01 00:00 UTC */
};
/* Start with { .type = ... }; a failed allocation sets `failed`, which stays set: the
 * array is then lost (take gives NULL). */
struct pg_bin_array {
	char *p; /* room for the header, then the elements */
	size_t len, cap;
	enum pg_type_oid type;
	int32_t n;
	bool has_null, failed;
};
/* Append an element of the array's type (text: NULL for a NULL element). */
void pg_bin_text(struct pg_bin_array *a, const char *value);
void pg_bin_int8(struct pg_bin_array *a, int64_t value);
void pg_bin_int4(struct pg_bin_array *a, int32_t value);
void pg_bin_bool(struct pg_bin_array *a, bool value);
/* The whole array (header and elements) for a binary parameter, its length in *len;
 * NULL when out of memory. Caller frees. The array is empty again after. */
char *pg_bin_array_take(struct pg_bin_array *a, int *len) __attribute__((warn_unused_result));
void pg_bin_array_free(struct pg_bin_array *a);
/* A big-endian integer of `bytes` bytes: a binary result's int2/int4/int8/xid8. */
uint64_t pg_bin_uint(const char *p, int bytes);

/* The SQLSTATE of a result ("23505"), or "" when none. */
const char *pg_sqlstate(const PGresult *res);

#endif
