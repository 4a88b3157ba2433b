/* daybook-admin rebuild [redis|sql|all]: fold the whole log into shadow read models
 * (SQL shadow tables, a new Redis generation) while the services keep running, catch
 * up, then switch atomically under the projection switch lock. */
#include <errno.h>
#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <poll.h>
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
#include "strmap.h"

#define CHUNK 20000        /* events per read in reader order, and per committed chunk */
#define BULK_BLOCKS 500    /* heap blocks per read of the bulk (some 20,000 events) */
#define ACCOUNT_ROWS_MAX (8 << 20) /* bytes of account rows buffered before a COPY */
#define XFER_IDS_MAX (64 << 20)    /* bytes of transfer ids kept to delete the old keys by */
#define REDIS_FLUSH 20000  /* pipelined Redis commands before reading replies */
#define RESP_WRITE (256 << 10) /* bytes of commands buffered before they are written */
#define RUN_ID_LEN 48          /* a Redis run_id (40 hex digits) and a NUL */
#define HELD_MAX 200000    /* default DAYBOOK_REBUILD_HELD_MAX */
#define SWITCH_LOCK_WAIT "200ms" /* longest wait for a switch lock in one attempt */
#define SWITCH_RETRY_US 500000   /* pause between attempts */

/* The one piece of process-wide state: set by the signal handler, read by the loop. */
static volatile sig_atomic_t interrupted;

struct acct {
	struct readmodel_row row; /* the shared fold's */
	int64_t opened_at, updated_at; /* PostgreSQL timestamptz: µs since 2000-01-01 UTC */
	int32_t expected;  /* statement items the log had when counted (a lower bound) */
	int32_t at_cp;     /* items folded at or below the hints' checkpoint */
	int32_t sent;      /* statement items sent to Redis */
	int32_t written;   /* the version last written to the shadow models (0: none) */
	bool listed;       /* in rb->holders */
	struct stashed *stash; /* events read before their predecessor, by version */
	int32_t npending;  /* items waiting to go in one LPUSH with the account's next ones */
	char **pending;    /* their JSON (owned), READMODEL_ITEMS_KEPT slots once needed */
};

/* An event as a read of the log gives it; data is its JSON text, not NUL-terminated. */
struct logged {
	int64_t position, at;
	uint64_t txid;
	int32_t version;
	enum ledger_event_type type;
	const char *data;
	size_t len;
};

/* An event read before its stream's previous one (the heap does not keep streams in
 * order), waiting for it. */
struct stashed {
	struct stashed *next;
	struct logged ev;
	char text[]; /* ev.data */
};

/* Redis switches inside the SQL transaction, so that no projector batch lands in
 * between; if that transaction then does not commit, Redis's live generation is put
 * back as it was. */
struct live_before {
	bool read, present;
	char gen[32];
};

struct rebuild {
	struct admin_ctx *ctx;
	PGconn *pg;        /* reads the log; its next read runs while the writer works */
	PGconn *wr;        /* writes the shadow tables and runs the switch */
	struct copier copier;
	bool read_pending; /* a read of the next chunk was sent on pg */
	redisContext *redis;
	bool sql, want_redis;
	long long gen;
	char identity[READMODEL_IDENTITY_MAX]; /* the store's, which our generation records */
	char redis_run_id[RUN_ID_LEN]; /* the server's, to know it again after a reconnect */
	struct live_before live_before; /* the live pointer as the switch found it */
	uint64_t cp_txid;   /* the checkpoint: the last event applied in reader order */
	long long position;
	char bulk_xmin[24]; /* the bulk is every event below this, read in heap order */
	long long bulk_blocks, bulk_next;
	bool bulk_read;     /* the pending read is one of the bulk */
	long long stashed;  /* events waiting for their predecessors */
	bool hinted;        /* expected comes from the live models, checked by at_cp */
	uint64_t hint_txid; /* the live models' checkpoint */
	long long hint_pos;
	struct strmap *accounts, *totals;
	struct ledger_event_buf data; /* the decoded event's strings */
	struct copy_buf entries, transfers; /* binary COPY data of the chunk */
	struct copy_buf xfer_ids; /* every transfer id folded, NUL-separated; p NULL past the cap */
	bool xfer_ids_full;
	long long held, held_max; /* statement items held for Redis, all accounts */
	struct acct **holders;    /* accounts that have held items since the last send_held */
	size_t nholders, holders_cap;
	struct copy_buf resp; /* commands not written to Redis yet, in RESP */
	size_t redis_queued; /* commands sent whose replies are not read yet */
	size_t redis_prev;   /* of those, the ones sent before the current chunk */
	long long done, total;
	double started, last_report;
	double loaded, indexed, switched; /* when each phase ended, for the summary */
	bool tty;          /* stderr is a terminal: a progress bar and text; else JSON lines */
	const char *phase;
	char error[2048];  /* the first error, for the final line */
	int failure;       /* the exit status if it fails: CLI_EXIT_PROBLEM unless a
			    * dependency was unavailable (CLI_EXIT_UNAVAILABLE) */
};

/* One JSON object as a line on stdout (stolen). */
static void json_line(json_t *obj)
{
	char *text = obj ? json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;

	if (text) {
		puts(text);
		fflush(stdout);
	}
	free(text);
	json_decref(obj);
}

/* A message: on a terminal "daybook-admin rebuild: ..." on stderr, otherwise a JSON
 * line {"phase":"error","error":"..."} (or "note") on stdout; one line either way. */
static void rb_say(struct rebuild *rb, bool error, const char *fmt, va_list ap)
{
	char msg[2048], line[2048];
	const char *kind = error ? "error" : "note";

	vsnprintf(msg, sizeof(msg), fmt, ap);
	log_oneline(msg, line, sizeof(line));
	if (error && !rb->error[0])
		snprintf(rb->error, sizeof(rb->error), "%s", line);
	if (rb->tty)
		fprintf(stderr, "daybook-admin rebuild: %s\n", line);
	else
		json_line(json_pack("{s:s, s:o}", "phase", kind, kind, log_text(line)));
}

/* An error; the first is kept for the final line. */
__attribute__((format(printf, 2, 3))) static void rb_error(struct rebuild *rb, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	rb_say(rb, true, fmt, ap);
	va_end(ap);
}

/* Something the operator should know that does not stop the rebuild. */
__attribute__((format(printf, 2, 3))) static void rb_note(struct rebuild *rb, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	rb_say(rb, false, fmt, ap);
	va_end(ap);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

/* --- Redis pipeline ------------------------------------------------------------------- */

/* Read the replies of the n oldest commands. */
static bool redis_drain_n(struct rebuild *rb, size_t n)
{
	bool ok = true;

	for (; n > 0; n--, rb->redis_queued--) {
		redisReply *reply = NULL;
		if (redisGetReply(rb->redis, (void **)&reply) != REDIS_OK) {
			rb_error(rb, "redis: %s\n", rb->redis->errstr);
			return false;
		}
		if (reply->type == REDIS_REPLY_ERROR) {
			rb_error(rb, "redis: %s\n", reply->str);
			ok = false;
		}
		freeReplyObject(reply);
	}
	return ok;
}

static bool redis_write_out(struct rebuild *rb);

static bool redis_drain(struct rebuild *rb)
{
	rb->redis_prev = 0;
	return redis_write_out(rb) && redis_drain_n(rb, rb->redis_queued);
}

/* Write the buffered commands out without waiting for their replies: Redis works on
 * them while the next chunk is read from PostgreSQL. */
static bool redis_write_out(struct rebuild *rb)
{
	struct copy_buf *b = &rb->resp;

	if (rb->redis->err)
		return false;
	for (size_t at = 0; at < b->len;) {
		ssize_t n = send(rb->redis->fd, b->p + at, b->len - at, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) { /* EAGAIN: the command timeout passed */
			/* Part of a command may have gone: the connection is unusable, and
			 * hiredis is told so, so that nothing else is sent on it. */
			rb->redis->err = REDIS_ERR_IO;
			snprintf(rb->redis->errstr, sizeof(rb->redis->errstr), "writing: %s",
				 n < 0 ? strerror(errno) : "nothing written");
			rb_error(rb, "redis: %s\n", rb->redis->errstr);
			b->len = 0;
			return false;
		}
		at += (size_t)n;
	}
	b->len = 0;
	return true;
}

static char *put_len(char *p, char kind, size_t n)
{
	char digits[24];
	int d = 0;

	*p++ = kind;
	do
		digits[d++] = (char)('0' + n % 10);
	while ((n /= 10) > 0);
	while (d > 0)
		*p++ = digits[--d];
	*p++ = '\r';
	*p++ = '\n';
	return p;
}

/* Commands are put in RESP into one buffer that is kept and reused, and written out
 * once it holds RESP_WRITE bytes; hiredis's own output buffer would be freed each
 * time it empties and grown again, page by fresh page. Replies are read by hiredis. */
static bool redis_send(struct rebuild *rb, int argc, const char **argv)
{
	struct copy_buf *b = &rb->resp;
	size_t need = 24;
	char *p;

	for (int i = 0; i < argc; i++)
		need += strlen(argv[i]) + 24;
	if (!copy_reserve(b, need))
		return false;
	p = put_len(b->p + b->len, '*', (size_t)argc);
	for (int i = 0; i < argc; i++) {
		size_t n = strlen(argv[i]);
		p = put_len(p, '$', n);
		memcpy(p, argv[i], n);
		p += n;
		*p++ = '\r';
		*p++ = '\n';
	}
	b->len = (size_t)(p - b->p);
	rb->redis_queued++;
	if (b->len >= RESP_WRITE && !redis_write_out(rb))
		return false;
	return rb->redis_queued < 4 * REDIS_FLUSH || redis_drain(rb);
}

/* A key of our generation (readmodel_key), truncated to len - 1 bytes. */
static void rkey(const struct rebuild *rb, char *out, size_t len, const char *kind, const char *id)
{
	readmodel_key(out, len, rb->gen, kind, id);
}

/* --- progress --------------------------------------------------------------------------- */

static void report(struct rebuild *rb, bool final)
{
	double t = now(), rate = rb->done / (t - rb->started + 1e-9);
	double eta = rate > 0 && rb->total > rb->done ? (double)(rb->total - rb->done) / rate : 0;

	if (!final && t - rb->last_report < (rb->tty ? 0.1 : 1.0))
		return;
	rb->last_report = t;
	if (rb->tty) {
		int width = 30, fill = rb->total ? (int)(width * (double)rb->done / (double)rb->total) : width;
		fprintf(stderr, "\r%-9s [%.*s%*s] %lld/%lld events  %.0f ev/s  ETA %.0fs ", rb->phase,
			fill > width ? width : fill, "##############################",
			width - (fill > width ? width : fill), "", rb->done, rb->total, rate, eta);
		if (final)
			fputc('\n', stderr);
	} else {
		printf("{\"phase\":\"%s\",\"done\":%lld,\"total\":%lld,\"events_per_s\":%.0f,"
		       "\"eta_s\":%.1f}\n",
		       rb->phase, rb->done, rb->total, rate, eta);
		fflush(stdout);
	}
}

/* --- folding -------------------------------------------------------------------------- */

static struct readmodel_totals *total_of(struct rebuild *rb, const char *currency)
{
	struct readmodel_totals *t = strmap_get(rb->totals, currency);

	if (!t && (t = calloc(1, sizeof(*t)))) {
		snprintf(t->currency, sizeof(t->currency), "%s", currency);
		if (!strmap_put(rb->totals, currency, t)) {
			free(t);
			t = NULL;
		}
	}
	return t;
}

/* Send an account's held statement items, oldest first, in one LPUSH: the statement
 * list has the newest first. */
static bool send_items(struct rebuild *rb, struct acct *a)
{
	char k[LEDGER_ID_MAX + 48];
	const char *argv[2 + READMODEL_ITEMS_KEPT];
	bool ok;

	if (a->npending == 0)
		return true;
	rkey(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, a->row.acc.id);
	/* The generation is new, but its number may not be: Redis that lost its data
	 * counts generations from 1 again, and a projector batch in flight then may have
	 * left keys under it. A statement is pushed onto, so it starts empty. */
	argv[0] = "DEL";
	argv[1] = k;
	if (a->sent == 0 && !redis_send(rb, 2, argv))
		return false;
	argv[0] = "LPUSH";
	argv[1] = k;
	for (int32_t i = 0; i < a->npending; i++)
		argv[2 + i] = a->pending[i];
	ok = redis_send(rb, 2 + a->npending, argv);
	for (int32_t i = 0; i < a->npending; i++)
		free(a->pending[i]);
	a->sent += a->npending;
	rb->held -= a->npending;
	a->npending = 0;
	return ok;
}

static bool send_held(struct rebuild *rb);

/* Hold a statement item (json is taken over) until the account has a full LPUSH; at
 * most held_max in all (accounts whose items are spread thinly over a long log would
 * otherwise hold theirs to the end): beyond that, every held item is sent. */
static bool hold_item(struct rebuild *rb, struct acct *a, char *json)
{
	if (!json)
		return false;
	if (!a->pending) {
		a->pending = calloc(READMODEL_ITEMS_KEPT, sizeof(*a->pending));
		if (!a->pending) {
			free(json);
			return false;
		}
	}
	if (!a->listed) {
		if (rb->nholders == rb->holders_cap) {
			size_t cap = rb->holders_cap ? 2 * rb->holders_cap : 1024;
			struct acct **h = realloc(rb->holders, cap * sizeof(*h));
			if (!h) {
				free(json);
				return false;
			}
			rb->holders = h;
			rb->holders_cap = cap;
		}
		rb->holders[rb->nholders++] = a;
		a->listed = true;
	}
	a->pending[a->npending++] = json;
	rb->held++;
	if (a->npending == READMODEL_ITEMS_KEPT && !send_items(rb, a))
		return false;
	return rb->held <= rb->held_max || send_held(rb);
}

static void acct_free(void *value)
{
	struct acct *a = value;

	for (int32_t i = 0; a && i < a->npending; i++)
		free(a->pending[i]);
	if (a) {
		free(a->pending);
		while (a->stash) {
			struct stashed *s = a->stash;
			a->stash = s->next;
			free(s);
		}
	}
	free(a);
}

/* The statement item: a COPY row for SQL, held for one LPUSH per account for Redis. */
static bool emit_entry(struct rebuild *rb, struct acct *a, const struct ledger_event *ev, int64_t at)
{
	struct copy_buf *b = &rb->entries;
	char at_text[READMODEL_TIME_LEN];
	struct readmodel_entry e = readmodel_entry_of(&a->row, ev, at_text);
	bool ok = true;

	if (rb->sql)
		ok = copy_row(b, 9) && copy_text(b, a->row.acc.id) && copy_int(b, e.version, 4) &&
		     copy_text(b, e.type) && copy_int(b, e.amount, 8) &&
		     copy_int(b, e.balance_after, 8) && copy_text(b, e.transfer_id) &&
		     copy_text(b, e.counterparty) && copy_text(b, e.reference) && copy_int(b, at, 8);
	/* Redis keeps the newest items only: skip those certain to be trimmed, and send
	 * the rest as one LPUSH per account rather than a command per item. */
	if (ok && rb->redis && a->row.entries > a->expected - READMODEL_ITEMS_KEPT) {
		readmodel_time_text(at, at_text);
		ok = hold_item(rb, a, readmodel_entry_json(&e));
	}
	return ok;
}

/* Transfer ids, so that the old generation's transfer keys can be deleted by name
 * after the switch; past XFER_IDS_MAX bytes (about three million transfers) the
 * cleanup scans for them instead. */
static void keep_xfer_id(struct rebuild *rb, const char *id)
{
	struct copy_buf *b = &rb->xfer_ids;
	size_t n = strlen(id) + 1;

	if (rb->xfer_ids_full)
		return;
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? 2 * b->cap : 1 << 16;
		char *p = cap <= XFER_IDS_MAX ? realloc(b->p, cap) : NULL;
		if (!p) {
			free(b->p);
			*b = (struct copy_buf){ 0 };
			rb->xfer_ids_full = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, id, n);
	b->len += n;
}

static bool emit_transfer(struct rebuild *rb, const struct acct *from, const struct ledger_event *ev,
			  int64_t at)
{
	struct copy_buf *b = &rb->transfers;
	char at_text[READMODEL_TIME_LEN];
	struct readmodel_transfer t = readmodel_transfer_of(&from->row, ev, at_text);
	bool ok = true;

	if (rb->sql)
		ok = copy_row(b, 7) && copy_text(b, t.transfer_id) && copy_text(b, t.from) &&
		     copy_text(b, t.to) && copy_int(b, t.amount, 8) &&
		     copy_text(b, t.currency) && copy_text(b, t.reference) && copy_int(b, at, 8);
	if (ok && rb->redis) {
		char k[READMODEL_KEY_MAX], *json;
		readmodel_time_text(at, at_text);
		json = readmodel_transfer_json(&t);
		const char *argv[3] = { "SET", k, json };
		rkey(rb, k, sizeof(k), READMODEL_KIND_TRANSFER, t.transfer_id);
		ok = json && redis_send(rb, 3, argv);
		free(json);
		keep_xfer_id(rb, t.transfer_id);
	}
	return ok;
}

/* Big-endian integers of the read query's binary results. */
static uint64_t be(const char *p, int bytes)
{
	uint64_t v = 0;

	for (int i = 0; i < bytes; i++)
		v = v << 8 | (unsigned char)p[i];
	return v;
}

/* Apply one event to its account, in version order (the shared fold). */
static bool apply(struct rebuild *rb, const char *id, struct acct *a, const struct logged *e)
{
	struct ledger_event ev;
	struct readmodel_change change;
	struct readmodel_totals *t;
	bool ok = e->type && e->version == a->row.acc.version + 1 &&
		  ledger_event_from_text(e->type, e->data, e->len, &rb->data, &ev) &&
		  readmodel_fold(&a->row, id, e->version, &ev, &change);

	if (ok && change.opened)
		a->opened_at = e->at;
	if (ok) {
		a->updated_at = e->at;
		ok = (t = total_of(rb, a->row.acc.currency)) != NULL;
		if (ok)
			readmodel_count_add(&t->count, &change.totals);
	}
	if (ok && change.entry_type) {
		if (rb->hinted && (e->txid < rb->hint_txid ||
				   (e->txid == rb->hint_txid && e->position <= rb->hint_pos)))
			a->at_cp++;
		ok = emit_entry(rb, a, &ev, e->at);
	}
	if (ok && change.transfer)
		ok = emit_transfer(rb, a, &ev, e->at);
	if (ok && (e->txid > rb->cp_txid || (e->txid == rb->cp_txid && e->position > rb->position))) {
		rb->cp_txid = e->txid;
		rb->position = e->position;
	}
	if (!ok)
		rb_error(rb, "cannot fold event %lld (account-%s v%d)\n",
			(long long)e->position, id, e->version);
	return ok;
}

/* Keep an event that came before its predecessor, in version order. */
static bool stash(struct rebuild *rb, const char *id, struct acct *a, const struct logged *e)
{
	struct stashed *s = malloc(sizeof(*s) + e->len), **at = &a->stash;

	if (!s)
		return false;
	s->ev = *e;
	memcpy(s->text, e->data, e->len);
	s->ev.data = s->text;
	while (*at && (*at)->ev.version < e->version)
		at = &(*at)->next;
	if (*at && (*at)->ev.version == e->version) {
		rb_error(rb, "account-%s has two events of version %d\n", id,
			e->version);
		free(s);
		return false;
	}
	s->next = *at;
	*at = s;
	rb->stashed++;
	return true;
}

/* Fold one row of a read (binary): position, txid, account, version, type, data (jsonb:
 * a format version byte, 1, then JSON text), recorded_at. An event ahead of its
 * account waits for the ones before it. */
static bool fold_row(struct rebuild *rb, PGresult *r, int i)
{
	const char *id = PQgetvalue(r, i, 2), *data = PQgetvalue(r, i, 5);
	int len = PQgetlength(r, i, 5);
	struct logged e = {
		.position = (int64_t)be(PQgetvalue(r, i, 0), 8), .txid = be(PQgetvalue(r, i, 1), 8),
		.version = (int32_t)be(PQgetvalue(r, i, 3), 4),
		.type = ledger_event_type_from_name(PQgetvalue(r, i, 4)),
		.at = (int64_t)be(PQgetvalue(r, i, 6), 8), .data = data + 1,
		.len = len > 0 ? (size_t)len - 1 : 0,
	};
	struct acct *a = strmap_get(rb->accounts, id);
	bool ok;

	if (len < 1 || data[0] != 1) {
		rb_error(rb, "event %lld: unexpected jsonb format\n",
			(long long)e.position);
		return false;
	}
	if (!a && (!(a = calloc(1, sizeof(*a))) || !strmap_put(rb->accounts, id, a))) {
		free(a);
		return false;
	}
	if (e.version > a->row.acc.version + 1)
		return stash(rb, id, a, &e);
	ok = apply(rb, id, a, &e);
	while (ok && a->stash && a->stash->ev.version == a->row.acc.version + 1) {
		struct stashed *s = a->stash;
		a->stash = s->next;
		rb->stashed--;
		ok = apply(rb, id, a, &s->ev);
		free(s);
	}
	return ok;
}

/* At the end: send what the account still holds, and trim its statement if it got
 * more than Redis keeps (items appended while the rebuild ran). */
static bool finish_items(struct rebuild *rb, struct acct *a)
{
	char k[READMODEL_KEY_MAX], stop[16];
	const char *argv[4] = { "LTRIM", k, "0", stop };

	if (!send_items(rb, a))
		return false;
	if (a->sent <= READMODEL_ITEMS_KEPT)
		return true;
	rkey(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, a->row.acc.id);
	snprintf(stop, sizeof(stop), "%d", READMODEL_ITEMS_KEPT - 1);
	return redis_send(rb, 4, argv);
}

static bool send_held(struct rebuild *rb)
{
	bool ok = true;

	for (size_t i = 0; i < rb->nholders; i++) {
		ok = ok && send_items(rb, rb->holders[i]);
		rb->holders[i]->listed = false;
	}
	rb->nholders = 0;
	return ok;
}

/* Write what a chunk produced: COPY the rows (from the copier thread during the load)
 * and let Redis work on its commands while the next chunk is read. */
static bool flush_chunk(struct rebuild *rb)
{
	bool ok;

	if (rb->sql && rb->copier.running &&
	    !copier_submit(&rb->copier, &rb->entries, &rb->transfers))
		return false;
	if (rb->sql && !rb->copier.running &&
	    (!copy_in(rb->wr, "rm_entries_shadow", &rb->entries) ||
	     !copy_in(rb->wr, "rm_transfers_shadow", &rb->transfers)))
		return false;
	if (!rb->redis)
		return true;
	/* The previous chunk's replies are due; this chunk's go out unanswered. */
	ok = redis_drain_n(rb, rb->redis_prev) && redis_write_out(rb);
	rb->redis_prev = rb->redis_queued;
	return ok;
}

#define READ_COLUMNS "SELECT position, txid, substr(stream, 9), version, type, data, recorded_at "

/* The next read: the bulk's next blocks while any are left (a TID range scan, which
 * costs a third less than reading in reader order through the index), then what
 * follows the checkpoint in reader order. Results come in binary: no text
 * conversions on the server. */
static bool send_read(struct rebuild *rb)
{
	char a[48], b[48], limit[16];
	const char *params[3] = { a, b, limit };

	rb->bulk_read = rb->bulk_next < rb->bulk_blocks;
	if (rb->bulk_read) {
		snprintf(a, sizeof(a), "(%lld,0)", rb->bulk_next);
		rb->bulk_next += BULK_BLOCKS;
		snprintf(b, sizeof(b), "(%lld,0)", rb->bulk_next);
		params[2] = rb->bulk_xmin;
		rb->read_pending = PQsendQueryParams(
			rb->pg,
			READ_COLUMNS "FROM events WHERE ctid >= $1::tid AND ctid < $2::tid AND txid < $3::xid8",
			3, NULL, params, NULL, NULL, 1);
	} else {
		snprintf(a, sizeof(a), "%llu", (unsigned long long)rb->cp_txid);
		snprintf(b, sizeof(b), "%lld", rb->position);
		snprintf(limit, sizeof(limit), "%d", CHUNK);
		rb->read_pending = PQsendQueryParams(
			rb->pg,
			READ_COLUMNS "FROM events WHERE (txid, position) > ($1::xid8, $2::bigint) "
			"AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
			"ORDER BY events.txid, events.position LIMIT $3",
			3, NULL, params, NULL, NULL, 1);
	}
	if (!rb->read_pending)
		rb_error(rb, "reading the log: %s", PQerrorMessage(rb->pg));
	return rb->read_pending;
}

/* The pending read's rows, or NULL on failure. Caller PQclear()s. */
static PGresult *take_read(struct rebuild *rb)
{
	PGresult *r, *rows = NULL;

	while ((r = PQgetResult(rb->pg))) {
		if (!rows && PQresultStatus(r) == PGRES_TUPLES_OK) {
			rows = r;
			continue;
		}
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			rb_error(rb, "reading the log: %s", PQresultErrorMessage(r));
		PQclear(r);
	}
	rb->read_pending = false;
	return rows;
}

/* Fold the next chunk of the log; *n gets its size. The read of the chunk after is
 * sent before folding, so PostgreSQL reads while we fold and write: any bulk read
 * left, or, in reader order, the next after a full chunk (its start, the last row
 * here, is known before folding). */
static bool fold_chunk(struct rebuild *rb, int *n)
{
	PGresult *r;
	bool ok = true, bulk;

	if (!rb->read_pending && !send_read(rb))
		return false;
	bulk = rb->bulk_read;
	if (!(r = take_read(rb)))
		return false;
	*n = PQntuples(r);
	rb->done += *n;
	if (!bulk && *n > 0) {
		rb->cp_txid = be(PQgetvalue(r, *n - 1, 1), 8);
		rb->position = (long long)be(PQgetvalue(r, *n - 1, 0), 8);
	}
	if (bulk ? rb->bulk_next < rb->bulk_blocks : *n == CHUNK)
		ok = send_read(rb);
	for (int row = 0; ok && row < *n; row++)
		ok = fold_row(rb, r, row);
	PQclear(r);
	return ok && flush_chunk(rb);
}

/* --- the end state: accounts and totals --------------------------------------------- */

/* Accounts are written after the load, before the keys are built and outside the
 * switch lock; the switch then rewrites only those that its tail of the log changed. */
struct account_walk {
	struct rebuild *rb;
	PGconn *pg; /* where the rows go */
	struct copy_buf *rows;
	struct evbuffer *ids; /* the switch's: accounts written again, as a text[] literal */
	size_t n;
	bool ok;
};

static void put_account(void *arg, const char *id, void *value)
{
	struct account_walk *w = arg;
	struct acct *a = value;
	struct copy_buf *b = w->rows;
	const char *status = readmodel_status(&a->row.acc);

	/* Counted before the rebuild began but never opened: nothing to write. */
	if (!w->ok || !ledger_account_exists(&a->row.acc) || a->written == a->row.acc.version)
		return;
	a->written = a->row.acc.version;
	if (w->ids)
		pg_array_append(w->ids, id, w->n == 0);
	w->n++;
	if (w->rb->redis)
		w->ok = finish_items(w->rb, a);
	if (w->ok && w->rb->sql)
		w->ok = copy_row(b, 10) && copy_text(b, id) && copy_text(b, a->row.name) &&
			copy_text(b, a->row.acc.currency) && copy_int(b, a->row.acc.balance, 8) &&
			copy_int(b, a->row.acc.overdraft_limit, 8) && copy_text(b, status) &&
			copy_int(b, a->row.acc.version, 4) && copy_int(b, a->row.entries, 4) &&
			copy_int(b, a->opened_at, 8) && copy_int(b, a->updated_at, 8);
	/* The first pass COPYs as it goes; the switch's rewrite deletes the old rows first. */
	if (w->ok && w->rb->sql && !w->ids && b->len > ACCOUNT_ROWS_MAX)
		w->ok = copy_in(w->pg, "rm_accounts_shadow", b);
	if (w->ok && w->rb->redis) {
		char opened[READMODEL_TIME_LEN], updated[READMODEL_TIME_LEN];
		struct readmodel_account body = readmodel_account_of(&a->row, opened, updated);
		char k[READMODEL_KEY_MAX], v[16], n[16], *json;
		readmodel_time_text(a->opened_at, opened);
		readmodel_time_text(a->updated_at, updated);
		json = readmodel_account_json(&body);
		const char *argv[8] = { "HSET", k, "v", v, "n", n, "j", json };
		rkey(w->rb, k, sizeof(k), READMODEL_KIND_ACCOUNT, id);
		snprintf(v, sizeof(v), "%d", a->row.acc.version);
		snprintf(n, sizeof(n), "%d", a->row.entries);
		w->ok = json && redis_send(w->rb, 8, argv);
		free(json);
	}
}

struct totals_walk {
	struct readmodel_totals **sorted;
	size_t n;
};

static void collect_total(void *arg, const char *currency, void *value)
{
	struct totals_walk *w = arg;

	(void)currency;
	w->sorted[w->n++] = value;
}

/* The few totals rows: a plain INSERT each (balance_sum is numeric, whose binary
 * form is not worth writing for a row per currency). */
static bool sql_totals(struct rebuild *rb, struct readmodel_totals **t, size_t n)
{
	bool ok = true;

	for (size_t i = 0; ok && i < n; i++) {
		char accounts[24], open[24], sum[48];
		const char *params[4] = { t[i]->currency, accounts, open, sum };
		PGresult *r;

		snprintf(accounts, sizeof(accounts), "%lld", (long long)t[i]->count.accounts);
		snprintf(open, sizeof(open), "%lld", (long long)t[i]->count.open_accounts);
		readmodel_int128_text(t[i]->count.balance_sum, sum);
		r = PQexecParams(rb->wr, "INSERT INTO rm_totals_shadow VALUES ($1, $2, $3, $4)", 4,
				 NULL, params, NULL, NULL, 0);
		ok = PQresultStatus(r) == PGRES_COMMAND_OK;
		if (!ok)
			rb_error(rb, "writing the totals: %s", PQresultErrorMessage(r));
		PQclear(r);
	}
	return ok;
}

static int by_currency(const void *a, const void *b)
{
	return strcmp((*(struct readmodel_totals *const *)a)->currency,
		      (*(struct readmodel_totals *const *)b)->currency);
}

/* The totals body into Redis, with the checkpoint token. */
static bool redis_totals(struct rebuild *rb, struct readmodel_totals **t, size_t n, const char *token)
{
	char k[READMODEL_KEY_MAX], *body = readmodel_totals_json_of((const struct readmodel_totals *const *)t, n);
	bool ok = false;

	if (body) {
		const char *argv[6] = { "HSET", k, "p", token, "j", body };
		rkey(rb, k, sizeof(k), READMODEL_KIND_TOTALS, NULL);
		ok = redis_send(rb, 6, argv);
	}
	free(body);
	return ok;
}

/* The switch's rewrite drops the rows it replaces first. */
static bool delete_accounts(struct rebuild *rb, PGconn *pg, struct evbuffer *ids)
{
	const char *params[1];
	PGresult *r;
	bool ok;

	evbuffer_add(ids, "}", 2); /* with the NUL */
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	r = PQexecParams(pg, "DELETE FROM rm_accounts_shadow WHERE account_id = ANY($1::text[])",
			 1, NULL, params, NULL, NULL, 0);
	ok = params[0] && PQresultStatus(r) == PGRES_COMMAND_OK;
	if (!ok)
		rb_error(rb, "rewriting accounts: %s", PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Every account not written yet or changed since: all of them after the load, those
 * the tail changed in the switch. Their statement items for Redis are finished too. */
static bool write_accounts(struct rebuild *rb, PGconn *pg, bool rewrite)
{
	struct copy_buf rows = { 0 };
	struct account_walk w = { rb, pg, &rows, NULL, 0, true };
	bool ok;

	if (rewrite && rb->sql && (!(w.ids = evbuffer_new()) || evbuffer_add(w.ids, "{", 1)))
		w.ok = false;
	if (w.ok)
		strmap_foreach(rb->accounts, put_account, &w);
	ok = w.ok && (!w.ids || w.n == 0 || delete_accounts(rb, pg, w.ids)) &&
	     (!rb->sql || copy_in(pg, "rm_accounts_shadow", &rows));
	if (w.ids)
		evbuffer_free(w.ids);
	free(rows.p);
	return ok;
}

static bool write_end_state(struct rebuild *rb, const char *token)
{
	struct totals_walk tw = { calloc(strmap_count(rb->totals) + 1, sizeof(struct readmodel_totals *)), 0 };
	bool ok = write_accounts(rb, rb->wr, true) && tw.sorted;

	if (ok) {
		strmap_foreach(rb->totals, collect_total, &tw);
		qsort(tw.sorted, tw.n, sizeof(*tw.sorted), by_currency);
		ok = (!rb->sql || sql_totals(rb, tw.sorted, tw.n)) &&
		     (!rb->redis || redis_totals(rb, tw.sorted, tw.n, token));
	}
	free(tw.sorted);
	return ok && (!rb->redis || redis_drain(rb));
}

/* --- phases ------------------------------------------------------------------------------- */

static bool exec_ok(struct rebuild *rb, PGconn *pg, const char *sql)
{
	PGresult *r = PQexec(pg, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	if (!ok)
		rb_error(rb, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Fold until the log is (nearly) exhausted; false on error or interruption. */
static bool load(struct rebuild *rb)
{
	int n = CHUNK;
	bool ok = !rb->sql || copier_start(&rb->copier, rb->wr);

	while (ok && rb->bulk_next < rb->bulk_blocks && !interrupted) {
		ok = fold_chunk(rb, &n);
		report(rb, false);
	}
	n = CHUNK; /* then what was appended meanwhile, in reader order */
	while (ok && n == CHUNK && !interrupted) {
		ok = fold_chunk(rb, &n);
		report(rb, false);
	}
	return copier_stop(&rb->copier) && ok && !interrupted;
}

/* Accounts whose live count was too high (more than the fold found at the live
 * checkpoint): their newest items were not all sent. */
static void find_short(void *arg, const char *id, void *value)
{
	struct evbuffer *ids = arg;
	const struct acct *a = value;

	if (a->expected > a->at_cp)
		pg_array_append(ids, id, evbuffer_get_length(ids) == 1);
}

#define REPAIR_ITEMS                                                                        \
	"SELECT e.account_id, " READMODEL_SQL_ENTRY_COLUMNS("e") " "                        \
	"FROM unnest($1::text[]) id, LATERAL (SELECT * FROM rm_entries_shadow x WHERE "     \
	"x.account_id = id ORDER BY x.version DESC LIMIT " READMODEL_ITEMS_KEPT_TEXT ") e " \
	"ORDER BY e.account_id, e.version"

/* Their statements again, from the indexed shadow table: everything the load folded. */
static bool repair_items(struct rebuild *rb)
{
	struct evbuffer *ids = evbuffer_new();
	const char *params[1];
	PGresult *r = NULL;
	bool ok = ids && evbuffer_add(ids, "{", 1) == 0;
	int repaired = 0;

	if (ok)
		strmap_foreach(rb->accounts, find_short, ids);
	if (ok && evbuffer_get_length(ids) > 1) {
		evbuffer_add(ids, "}", 2);
		params[0] = (const char *)evbuffer_pullup(ids, -1);
		r = PQexecParams(rb->wr, REPAIR_ITEMS, 1, NULL, params, NULL, NULL, 0);
		ok = PQresultStatus(r) == PGRES_TUPLES_OK;
		if (!ok)
			rb_error(rb, "repairing statements: %s", PQresultErrorMessage(r));
	}
	for (int row = 0; ok && r && row < PQntuples(r); row++) {
		const char *id = PQgetvalue(r, row, 0);
		struct acct *a = strmap_get(rb->accounts, id);
		char k[LEDGER_ID_MAX + 48];
		const char *del[2] = { "DEL", k };
		struct readmodel_entry e = readmodel_entry_from_pg(r, row, 1);
		if (!a)
			continue;
		if (a->expected > a->at_cp) { /* its first row: start the statement afresh */
			rkey(rb, k, sizeof(k), READMODEL_KIND_STATEMENT, id);
			ok = send_items(rb, a) && redis_send(rb, 2, del);
			a->expected = 0; /* every later item counts */
			a->sent = 0;
			repaired++;
		}
		ok = ok && hold_item(rb, a, readmodel_entry_json(&e));
	}
	ok = ok && send_held(rb);
	if (repaired)
		rb_note(rb, "the live count of %d account%s statement items was "
				"too high; their items were sent again\n", repaired, repaired == 1 ? "'s" : "s'");
	PQclear(r);
	if (ids)
		evbuffer_free(ids);
	return ok;
}

/* Wait until pg's pending query has its answer. Ctrl-C or SIGTERM, or a failure
 * elsewhere (abort), cancels it: a key build or a count over a large log can take
 * minutes, and the caller then fails and removes the shadow. */
static void await_answer(struct rebuild *rb, PGconn *pg, bool abort)
{
	bool cancelled = false;

	while (PQisBusy(pg)) {
		struct pollfd p = { .fd = PQsocket(pg), .events = POLLIN };
		if ((interrupted || abort) && !cancelled) {
			PGcancel *c = PQgetCancel(pg);
			char err[256];
			if (c && !PQcancel(c, err, sizeof(err)))
				rb_error(rb, "cancelling: %s\n", err);
			PQfreeCancel(c);
			cancelled = true;
		}
		if ((poll(&p, 1, 100) < 0 && errno != EINTR) || !PQconsumeInput(pg))
			return; /* PQgetResult reports the broken connection */
	}
}

/* Collect the results of a query sent on pg; false (printed) if any failed. With
 * abort, the query is cancelled: its outcome no longer matters. */
static bool sent_ok(struct rebuild *rb, PGconn *pg, const char *what, bool abort)
{
	PGresult *r;
	bool ok = true;

	while (await_answer(rb, pg, abort), (r = PQgetResult(pg))) {
		bool failed = PQresultStatus(r) != PGRES_TUPLES_OK &&
			      PQresultStatus(r) != PGRES_COMMAND_OK;
		if (failed && !abort) /* when aborting, the failure that led here is said */
			rb_error(rb, "%s: %s", what, PQresultErrorMessage(r));
		ok = ok && !failed;
		PQclear(r);
	}
	return ok && !abort;
}

/* After the load, PostgreSQL builds rm_entries_shadow's key on the writer's
 * connection while the reader's, idle until the switch reads the tail, takes the
 * accounts and builds the small tables' keys, and Redis takes the accounts and the
 * statement items still held: little is left for the switch. */
static bool index_and_send(struct rebuild *rb)
{
	bool ok, big = false, small = false;

	rb->phase = "index";
	report(rb, true);
	ok = !rb->sql || (big = PQsendQuery(rb->wr, "SELECT rm_shadow_key('rm_entries')"));
	ok = ok && write_accounts(rb, rb->pg, false);
	ok = ok && (!rb->sql || (small = PQsendQuery(rb->pg, "SELECT rm_shadow_key('rm_accounts'), "
							     "rm_shadow_key('rm_transfers'), "
							     "rm_shadow_key('rm_totals')")));
	if (ok && rb->redis)
		ok = redis_drain(rb);
	if (small)
		ok = sent_ok(rb, rb->pg, "indexing the shadow tables", !ok) && ok;
	if (big)
		ok = sent_ok(rb, rb->wr, "indexing the shadow tables", !ok) && ok;
	return ok && (!rb->hinted || repair_items(rb));
}

/* One attempt at the switch's locks: false with *busy set when one was not granted
 * within SWITCH_LOCK_WAIT. */
static bool try_lock(struct rebuild *rb, const char *sql, bool *busy)
{
	PGresult *r = PQexec(rb->wr, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	*busy = !ok && strcmp(pg_sqlstate(r), "55P03") == 0; /* lock_not_available */
	if (!ok && !*busy)
		rb_error(rb, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Begin the switch transaction holding the switch lock and, for SQL, the live tables
 * (the swap drops them). A reader of those tables, a long `verify` say, holds the
 * swap up: waiting in the lock queue would hold up every reader after it, so each
 * attempt waits SWITCH_LOCK_WAIT at most, then everything is let go for a while. */
static bool lock_for_switch(struct rebuild *rb)
{
	while (!interrupted) {
		bool busy = false;
		bool ok = exec_ok(rb, rb->wr, "BEGIN") &&
			  exec_ok(rb, rb->wr, "SET LOCAL synchronous_commit = on") &&
			  exec_ok(rb, rb->wr, "SET LOCAL lock_timeout = '" SWITCH_LOCK_WAIT "'") &&
			  try_lock(rb, "SELECT pg_advisory_xact_lock(" READMODEL_SWITCH_LOCK ")", &busy) &&
			  (!rb->sql || try_lock(rb, "LOCK TABLE rm_accounts, rm_entries, rm_transfers, "
						    "rm_totals IN ACCESS EXCLUSIVE MODE", &busy)) &&
			  exec_ok(rb, rb->wr, "SET LOCAL lock_timeout = 0");
		if (ok)
			return true;
		exec_ok(rb, rb->wr, "ROLLBACK");
		if (!busy)
			return false;
		if (strcmp(rb->phase, "wait") != 0) {
			rb->phase = "wait";
			report(rb, true);
			rb_note(rb, "waiting for the read-model tables: a "
					"transaction is reading them (a verify?)\n");
		}
		report(rb, false);
		usleep(SWITCH_RETRY_US);
	}
	return false;
}

static bool get_live(struct rebuild *rb, struct live_before *old)
{
	redisReply *r = redisCommand(rb->redis, "GET " READMODEL_LIVE_KEY);

	old->read = r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_NIL);
	old->present = old->read && r->type == REDIS_REPLY_STRING;
	snprintf(old->gen, sizeof(old->gen), "%s", old->present ? r->str : "");
	if (!old->read)
		rb_error(rb, "redis GET " READMODEL_LIVE_KEY " failed\n");
	freeReplyObject(r);
	return old->read;
}

/* The server's run_id (INFO server), which changes with every start. */
static bool redis_run_id(struct rebuild *rb, redisContext *c, char out[RUN_ID_LEN])
{
	redisReply *r = redisCommand(c, "INFO server");
	const char *at = r && r->type == REDIS_REPLY_STRING ? strstr(r->str, "run_id:") : NULL;
	size_t n = at ? strcspn(at + 7, "\r\n") : 0;
	bool ok = n > 0 && n < RUN_ID_LEN;

	if (ok)
		snprintf(out, RUN_ID_LEN, "%.*s", (int)n, at + 7);
	else
		rb_error(rb, "redis INFO server failed\n");
	freeReplyObject(r);
	return ok;
}

/* After a failure on the Redis connection, a new one (false if none can be had). It
 * must reach the same server, still running: a restarted Redis has a new run_id (and,
 * without persistence, nothing of ours), and a server that took the port of one that
 * died is someone else's. */
static bool redis_usable(struct rebuild *rb)
{
	char err[256], run_id[RUN_ID_LEN];

	if (!rb->redis->err)
		return true;
	redisFree(rb->redis);
	rb->resp.len = 0;
	rb->redis_queued = rb->redis_prev = 0;
	rb->redis = admin_redis_connect(&rb->ctx->cfg.redis, err, sizeof(err));
	if (!rb->redis) {
		rb_error(rb, "cannot reconnect to redis: %s\n", err);
		return false;
	}
	if (!redis_run_id(rb, rb->redis, run_id) || strcmp(run_id, rb->redis_run_id) != 0) {
		rb_error(rb, "redis is not the server the rebuild began with "
				"(restarted?): leaving it alone\n");
		redisFree(rb->redis);
		rb->redis = NULL;
		return false;
	}
	return true;
}

static void put_back_live(struct rebuild *rb, const struct live_before *old)
{
	redisReply *r = NULL;

	if (!rb->redis || !old->read)
		return;
	(void)!redis_drain(rb);
	if (redis_usable(rb))
		r = old->present ? redisCommand(rb->redis, "SET " READMODEL_LIVE_KEY " %s", old->gen)
				 : redisCommand(rb->redis, "DEL " READMODEL_LIVE_KEY);
	if (!r || r->type == REDIS_REPLY_ERROR)
		rb_error(rb, "could not put " READMODEL_LIVE_KEY " back to %s: set it by hand\n",
			old->present ? old->gen : "(none)");
	freeReplyObject(r);
}

/* COMMIT failed or its outcome is unknown (the connection broke): did the swap land? */
static bool committed_anyway(struct rebuild *rb, long long expected_gen)
{
	PGresult *r = PQexec(rb->pg, "SELECT generation FROM projection_checkpoints "
				     "WHERE projection = 'sql'");
	bool landed = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
		      atoll(PQgetvalue(r, 0, 0)) == expected_gen;

	PQclear(r);
	if (landed)
		rb_error(rb, "the switch committed although COMMIT failed\n");
	return landed;
}

/* The SQL generation before the swap, in the switch transaction. */
static bool sql_generation(struct rebuild *rb, long long *gen)
{
	PGresult *r = PQexec(rb->wr, "SELECT generation FROM projection_checkpoints "
				     "WHERE projection = 'sql'");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	*gen = ok ? atoll(PQgetvalue(r, 0, 0)) : 0;
	if (!ok)
		rb_error(rb, "reading the checkpoint: %s", PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Under the switch lock no projector commits: fold the rest, write the end state and
 * swap, all in one transaction. */
static bool switch_over(struct rebuild *rb)
{
	char token[48], gen[24];
	const char *live[3] = { "SET", READMODEL_LIVE_KEY, gen };
	struct live_before *old = &rb->live_before;
	long long sql_gen = 0;
	int n = 1;
	bool ok = true;

	if (!lock_for_switch(rb))
		return false;
	if (rb->sql && !sql_generation(rb, &sql_gen)) {
		exec_ok(rb, rb->wr, "ROLLBACK");
		return false;
	}
	rb->phase = "switch";
	while (ok && n > 0)
		ok = fold_chunk(rb, &n);
	if (ok && rb->stashed) {
		rb_error(rb, "%lld events wait for earlier versions that the log "
				"does not have\n", rb->stashed);
		ok = false;
	}
	snprintf(token, sizeof(token), "%llu.%lld", (unsigned long long)rb->cp_txid, rb->position);
	ok = ok && write_end_state(rb, token);
	if (ok && rb->sql) {
		char txid[24], pos[24];
		const char *params[2] = { txid, pos };
		snprintf(txid, sizeof(txid), "%llu", (unsigned long long)rb->cp_txid);
		snprintf(pos, sizeof(pos), "%lld", rb->position);
		PGresult *r = PQexecParams(rb->wr, "SELECT rm_shadow_swap($1::xid8, $2::bigint)", 2,
					   NULL, params, NULL, NULL, 0);
		ok = PQresultStatus(r) == PGRES_TUPLES_OK;
		if (!ok)
			rb_error(rb, "swapping the tables: %s", PQresultErrorMessage(r));
		PQclear(r);
	}
	if (ok && rb->redis) {
		char k[64], lk[64], msg[96];
		const char *cp[3] = { "SET", k, token }, *pub[3] = { "PUBLISH", READMODEL_POSITION_TOPIC, msg };
		char ik[64];
		const char *layout[3] = { "SET", lk, READMODEL_REDIS_LAYOUT };
		const char *identity[3] = { "SET", ik, rb->identity };
		rkey(rb, k, sizeof(k), READMODEL_KIND_CHECKPOINT, NULL);
		rkey(rb, lk, sizeof(lk), READMODEL_KIND_LAYOUT, NULL);
		rkey(rb, ik, sizeof(ik), READMODEL_KIND_IDENTITY, NULL);
		snprintf(gen, sizeof(gen), "%lld", rb->gen);
		snprintf(msg, sizeof(msg), "%lld %s", rb->gen, token);
		/* The identity again: Redis may have lost what was written at the start. */
		ok = redis_drain(rb) && get_live(rb, old) && redis_send(rb, 3, identity) &&
		     redis_send(rb, 3, layout) &&
		     redis_send(rb, 3, cp) &&
		     redis_send(rb, 3, live) && redis_send(rb, 3, pub) && redis_drain(rb);
	}
	if (!ok) {
		put_back_live(rb, old);
		exec_ok(rb, rb->wr, "ROLLBACK");
		return false;
	}
	if (exec_ok(rb, rb->wr, "COMMIT") || !rb->sql || committed_anyway(rb, sql_gen + 1))
		return true;
	put_back_live(rb, old);
	return false;
}

/* GET generation gen's key of `kind`; caller frees the reply. */
static redisReply *get_gen_key(struct rebuild *rb, long long gen, const char *kind)
{
	char k[64];

	readmodel_key(k, sizeof(k), gen, kind, NULL);
	return redisCommand(rb->redis, "GET %s", k);
}

/* May generation gen be deleted: was it built from this store, or from none (written
 * before generations recorded one)? Another store's may be another deployment's live
 * models (one Redis database shared by mistake): it is left to an operator. */
static bool ours_to_delete(struct rebuild *rb, long long gen)
{
	redisReply *r = get_gen_key(rb, gen, READMODEL_KIND_IDENTITY);
	bool ours = r && (r->type == REDIS_REPLY_NIL ||
			  (r->type == REDIS_REPLY_STRING && strcmp(r->str, rb->identity) == 0));

	if (r && !ours && r->type == REDIS_REPLY_STRING)
		rb_note(rb, "redis generation %lld was built from another "
				"event store (identity %s): left in place\n", gen, r->str);
	freeReplyObject(r);
	return ours;
}

/* The verdicts of ours_to_delete, by generation, for one sweep. */
struct verdicts {
	long long *gen;
	bool *ours;
	size_t n, cap;
};

static bool sweep_key(struct rebuild *rb, struct verdicts *v, const char *k)
{
	long long gen = readmodel_key_generation(k);
	bool ours;

	if (!gen)
		return false;
	for (size_t i = 0; i < v->n; i++)
		if (v->gen[i] == gen)
			return v->ours[i];
	ours = ours_to_delete(rb, gen);
	if (v->n == v->cap) {
		size_t cap = v->cap ? 2 * v->cap : 16;
		long long *g = realloc(v->gen, cap * sizeof(*g));
		bool *o = g ? realloc(v->ours, cap * sizeof(*o)) : NULL;
		if (g)
			v->gen = g;
		if (!o)
			return false; /* not remembered: not deleted */
		v->ours = o;
		v->cap = cap;
	}
	v->gen[v->n] = gen;
	v->ours[v->n++] = ours;
	return ours;
}

/* Delete every key of the generations other than `keep` (0: delete generation `drop`)
 * that are ours to delete. */
static void redis_cleanup(struct rebuild *rb, long long keep, long long drop)
{
	char cursor[32] = "0", match[48], prefix[48];
	struct verdicts verdicts = { 0 };

	/* Replies of pipelined commands come first: read them before talking again. */
	if (!redis_drain(rb))
		return;
	if (keep)
		snprintf(match, sizeof(match), "%s", READMODEL_GEN_MATCH);
	else
		readmodel_key_match(match, sizeof(match), drop);
	readmodel_key(prefix, sizeof(prefix), keep, "", NULL);
	do {
		redisReply *r = redisCommand(rb->redis, "SCAN %s MATCH %s COUNT 10000", cursor, match);
		const char **argv;
		int argc = 1;

		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
		    !(argv = malloc((r->element[1]->elements + 1) * sizeof(*argv)))) {
			freeReplyObject(r);
			return;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		argv[0] = "UNLINK"; /* one command for the page's keys */
		for (size_t i = 0; i < r->element[1]->elements; i++) {
			const char *k = r->element[1]->element[i]->str;
			if ((!keep || strncmp(k, prefix, strlen(prefix)) != 0) &&
			    sweep_key(rb, &verdicts, k))
				argv[argc++] = k;
		}
		if (argc > 1)
			(void)!(redis_send(rb, argc, argv) && redis_drain(rb));
		free(argv);
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	free(verdicts.gen);
	free(verdicts.ours);
}

/* The generation that was live before the switch is garbage now, and so is any
 * between it and ours (a rebuild that failed, a resync that never went live). The one
 * just before ours is deleted by name; others are looked for by their own pattern, so
 * that SCAN does not hand ours back page by page; past a few, or with no live
 * generation before, one sweep takes every other generation. */
#define UNLINK_BATCH 1000
#define KEY_LEN (LEDGER_ID_MAX + 48)

struct unlinks {
	struct rebuild *rb;
	long long gen;
	bool old_layout; /* that generation is of layout 1 (no `layout` key) */
	char (*keys)[KEY_LEN];
	const char *argv[1 + UNLINK_BATCH];
	int n;
	bool ok;
};

static void unlink_flush(struct unlinks *u)
{
	u->argv[0] = "UNLINK";
	if (u->n > 0 && u->ok)
		u->ok = redis_send(u->rb, 1 + u->n, u->argv); /* hiredis copies the keys */
	u->n = 0;
}

static void unlink_key(struct unlinks *u, const char *kind, const char *id)
{
	readmodel_key(u->keys[u->n], KEY_LEN, u->gen, kind, id);
	u->argv[1 + u->n] = u->keys[u->n];
	if (++u->n == UNLINK_BATCH)
		unlink_flush(u);
}

static void unlink_account(void *arg, const char *id, void *value)
{
	(void)value;
	struct unlinks *u = arg;

	unlink_key(u, READMODEL_KIND_ACCOUNT, id);
	unlink_key(u, READMODEL_KIND_STATEMENT, id);
	if (u->old_layout)
		unlink_key(u, READMODEL_KIND_ENTRIES_V1, id); /* layout 1's statements */
}

/* Was generation gen written in this code's layout? */
static bool same_layout(struct rebuild *rb, long long gen)
{
	redisReply *r = get_gen_key(rb, gen, READMODEL_KIND_LAYOUT);
	bool same = r && r->type == REDIS_REPLY_STRING && strcmp(r->str, READMODEL_REDIS_LAYOUT) == 0;

	freeReplyObject(r);
	return same;
}

/* The old generation is a fold of the same log, up to its own checkpoint: its keys
 * are those of the accounts and transfers folded here, so they are deleted by name
 * without scanning the keyspace. A key nothing here accounts for (an orphan) is left
 * to the projector's sweep of older generations. */
static void delete_by_name(struct rebuild *rb, long long gen)
{
	struct unlinks *u = calloc(1, sizeof(*u));

	if (!u || !(u->keys = malloc(UNLINK_BATCH * sizeof(*u->keys)))) {
		free(u);
		redis_cleanup(rb, 0, gen);
		return;
	}
	*u = (struct unlinks){ .rb = rb, .gen = gen, .keys = u->keys, .ok = redis_drain(rb) };
	u->old_layout = u->ok && !same_layout(rb, gen);
	strmap_foreach(rb->accounts, unlink_account, u);
	for (size_t at = 0; at < rb->xfer_ids.len; at += strlen(rb->xfer_ids.p + at) + 1)
		unlink_key(u, READMODEL_KIND_TRANSFER, rb->xfer_ids.p + at);
	unlink_key(u, READMODEL_KIND_TOTALS, NULL);
	unlink_key(u, READMODEL_KIND_CHECKPOINT, NULL);
	unlink_key(u, READMODEL_KIND_LAYOUT, NULL);
	unlink_key(u, READMODEL_KIND_IDENTITY, NULL);
	unlink_flush(u);
	if (u->ok)
		(void)!redis_drain(rb);
	free(u->keys);
	free(u);
}

static void cleanup_after_switch(struct rebuild *rb)
{
	const struct live_before *old = &rb->live_before;
	long long from = old->present ? atoll(old->gen) : 0;

	if (from <= 0 || from >= rb->gen || rb->gen - from > 8) {
		redis_cleanup(rb, rb->gen, 0);
		return;
	}
	if (from == rb->gen - 1 && !rb->xfer_ids_full && redis_drain(rb) &&
	    ours_to_delete(rb, from)) {
		delete_by_name(rb, from);
		return;
	}
	for (long long g = from; g < rb->gen; g++)
		redis_cleanup(rb, 0, g);
}

/* --- the command ---------------------------------------------------------------------- */

static bool connect_redis(struct rebuild *rb)
{
	char err[256], k[64];
	redisReply *r;
	PGresult *r0;

	if (!rb->ctx->cfg.redis_url) {
		rb->failure = CLI_EXIT_USAGE;
		rb_error(rb, "DAYBOOK_REDIS is not set: rebuilding redis needs it\n");
		return false;
	}
	r0 = PQexec(rb->wr, READMODEL_IDENTITY_SQL);
	if (PQresultStatus(r0) != PGRES_TUPLES_OK || PQntuples(r0) != 1 || PQgetisnull(r0, 0, 0) ||
	    PQgetlength(r0, 0, 0) == 0 || PQgetlength(r0, 0, 0) >= (int)sizeof(rb->identity)) {
		rb_error(rb, "reading the event store's identity (is the database "
				"migrated?): %s", PQresultErrorMessage(r0));
		PQclear(r0);
		return false;
	}
	snprintf(rb->identity, sizeof(rb->identity), "%s", PQgetvalue(r0, 0, 0));
	PQclear(r0);
	rb->redis = admin_redis_connect(&rb->ctx->cfg.redis, err, sizeof(err));
	if (!rb->redis) {
		rb->failure = CLI_EXIT_UNAVAILABLE;
		rb_error(rb, "cannot connect to redis: %s\n", err);
		return false;
	}
	r = redisCommand(rb->redis, "INCR " READMODEL_GENERATION_KEY);
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		rb_error(rb, "redis INCR " READMODEL_GENERATION_KEY " failed\n");
		freeReplyObject(r);
		return false;
	}
	rb->gen = r->integer;
	rkey(rb, k, sizeof(k), READMODEL_KIND_IDENTITY, NULL);
	freeReplyObject(r);
	/* Which store the generation is built from, before anything else goes in it: no
	 * projector's sweep then takes its keys for garbage of no store. */
	r = redisCommand(rb->redis, "SET %s %s", k, rb->identity);
	if (!r || r->type == REDIS_REPLY_ERROR) {
		rb_error(rb, "redis SET %s failed\n", k);
		freeReplyObject(r);
		return false;
	}
	freeReplyObject(r);
	return redis_run_id(rb, rb->redis, rb->redis_run_id);
}

#define COUNT_FROM_LOG                                                                  \
	"SELECT substr(stream, 9), count(*) FILTER (WHERE type IN ('FundsDeposited', "   \
	"'FundsWithdrawn', 'TransferSent', 'TransferReceived')), count(*) FROM events " \
	"WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) GROUP BY stream"
#define COUNT_FROM_LIVE                                                                  \
	"SELECT a.account_id, a.entries, (SELECT greatest(reltuples, 0)::bigint FROM pg_class " \
	"WHERE oid = 'events'::regclass), c.txid::text, c.position FROM rm_accounts a, "   \
	"projection_checkpoints c WHERE c.projection = 'sql'"

/* What Redis needs before the load, sent while the rest is set up: each account's
 * statement items, so that Redis is sent only the items that will be among its
 * newest. A count too high would leave the newest items short; too low only sends a
 * few more, which the end trims.
 * - Both models rebuilt: the live models' counts (rm_accounts.entries at their
 *   checkpoint; one small table rather than a pass over the log), each checked by the
 *   fold (at_cp): an account whose count was too high gets its items again from the
 *   shadow table once that is indexed (repair_items).
 * - Redis alone: the log counted below the snapshot xmin, which the fold will have
 *   applied at least.
 * - SQL alone: nothing.
 * The progress total is the planner's estimate of the log's size, or the count. */
/* The live models are worth taking counts from only if they are nearly current: if
 * more than a tenth of the log is past their checkpoint, the log is counted instead
 * (otherwise Redis would be sent every item of that tenth). */
static void choose_count(struct rebuild *rb)
{
	PGresult *r;

	if (!rb->hinted)
		return;
	r = PQexec(rb->pg, "SELECT (SELECT position FROM projection_checkpoints WHERE projection = "
			   "'sql'), (SELECT coalesce(max(position), 0) FROM events)");
	rb->hinted = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
		     !PQgetisnull(r, 0, 0) &&
		     (atoll(PQgetvalue(r, 0, 1)) - atoll(PQgetvalue(r, 0, 0))) * 10 <=
			     atoll(PQgetvalue(r, 0, 1));
	PQclear(r);
}

static bool send_count(struct rebuild *rb)
{
	bool ok = PQsendQuery(rb->pg, rb->hinted ? COUNT_FROM_LIVE : rb->want_redis ? COUNT_FROM_LOG :
				      "SELECT NULL, 0, greatest(reltuples, 0)::bigint FROM pg_class "
				      "WHERE oid = 'events'::regclass");

	if (!ok)
		rb_error(rb, "counting the log: %s", PQerrorMessage(rb->pg));
	return ok;
}

/* Its answer; for Redis, the accounts are created here, unopened. */
static bool take_count(struct rebuild *rb)
{
	PGresult *r, *extra;

	await_answer(rb, rb->pg, false);
	r = PQgetResult(rb->pg);
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;

	while ((extra = PQgetResult(rb->pg)))
		PQclear(extra);
	if (ok && rb->hinted) { /* a row per live account, each with the checkpoint */
		rb->hint_txid = PQntuples(r) ? strtoull(PQgetvalue(r, 0, 3), NULL, 10) : 0;
		rb->hint_pos = PQntuples(r) ? atoll(PQgetvalue(r, 0, 4)) : 0;
		rb->total = PQntuples(r) ? atoll(PQgetvalue(r, 0, 2)) : 0;
	}
	for (int row = 0; ok && row < PQntuples(r); row++) {
		if (!rb->hinted)
			rb->total += atoll(PQgetvalue(r, row, 2));
		if (!rb->want_redis)
			continue;
		struct acct *a = calloc(1, sizeof(*a));
		ok = a && strmap_put(rb->accounts, PQgetvalue(r, row, 0), a);
		if (!ok) {
			free(a);
			break;
		}
		a->expected = atoi(PQgetvalue(r, row, 1));
	}
	if (!ok)
		rb_error(rb, "counting the log: %s", PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* The bulk: every event of a transaction older than the snapshot xmin now, all
 * finished and so all in the heap's blocks as they are now. */
static bool bulk_bounds(struct rebuild *rb)
{
	PGresult *r = PQexec(rb->wr, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, "
				     "pg_relation_size('events') / current_setting('block_size')::bigint");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;

	if (ok) {
		snprintf(rb->bulk_xmin, sizeof(rb->bulk_xmin), "%s", PQgetvalue(r, 0, 0));
		rb->bulk_blocks = atoll(PQgetvalue(r, 0, 1));
	} else {
		rb_error(rb, "sizing the log: %s", PQresultErrorMessage(r));
	}
	PQclear(r);
	return ok;
}

static bool prepare(struct rebuild *rb)
{
	rb->pg = PQconnectdb(rb->ctx->cfg.pg);
	rb->wr = PQconnectdb(rb->ctx->cfg.pg);
	if (PQstatus(rb->pg) != CONNECTION_OK || PQstatus(rb->wr) != CONNECTION_OK) {
		rb->failure = CLI_EXIT_UNAVAILABLE;
		rb_error(rb, "cannot connect to PostgreSQL: %s",
			PQerrorMessage(PQstatus(rb->pg) != CONNECTION_OK ? rb->pg : rb->wr));
		return false;
	}
	if (!admin_event_store_usable(rb->pg, "rebuild")) {
		rb->failure = EVENTSTORE_EXIT_UNUSABLE;
		return false;
	}
	if (strmap_open(&rb->accounts, acct_free) || strmap_open(&rb->totals, free))
		return false;
	/* Both sessions write shadow tables and build keys. */
	for (int i = 0; i < 2; i++) {
		PGconn *c = i ? rb->wr : rb->pg;
		if (!exec_ok(rb, c, "SET client_min_messages = warning") ||
		    !exec_ok(rb, c, "SET synchronous_commit = off") || /* the swap commits durably */
		    !exec_ok(rb, c, "SET maintenance_work_mem = '256MB'")) /* keys sort in memory */
			return false;
	}
	choose_count(rb);
	if (!send_count(rb))
		return false;
	/* An autovacuum of a live table gives way to a lock request only after
	 * deadlock_timeout; the switch's attempts wait less than the default 1 s, so it is
	 * shortened (a superuser setting: without it, the switch waits for autovacuum). */
	PQclear(PQexec(rb->wr, "SET deadlock_timeout = '100ms'"));
	if (rb->sql && !exec_ok(rb, rb->wr, "SELECT rm_shadow_reset()"))
		return false;
	if ((rb->want_redis && !connect_redis(rb)) || !take_count(rb) || !bulk_bounds(rb))
		return false;
	return true;
}

static void abandon(struct rebuild *rb)
{
	if (rb->sql && rb->wr && PQstatus(rb->wr) == CONNECTION_OK)
		exec_ok(rb, rb->wr, "SELECT rm_shadow_drop()");
	if (rb->redis && rb->gen && redis_usable(rb))
		redis_cleanup(rb, 0, rb->gen);
	if (rb->tty) {
		fprintf(stderr, "daybook-admin: rebuild %s; the live read models are untouched\n",
			interrupted ? "interrupted" : "failed");
		return;
	}
	json_line(json_pack("{s:s, s:I, s:I, s:o, s:b}", "phase",
			    interrupted ? "interrupted" : "failed", "done", (json_int_t)rb->done,
			    "total", (json_int_t)rb->total,
			    "error", log_text(rb->error[0] ? rb->error : interrupted ? "interrupted"
										     : "failed"),
			    "live_untouched", 1));
}

static void finish(struct rebuild *rb)
{
	free(rb->entries.p);
	free(rb->transfers.p);
	free(rb->copier.entries.p);
	free(rb->copier.transfers.p);
	ledger_event_buf_free(&rb->data);
	free(rb->xfer_ids.p);
	free(rb->resp.p);
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
		fprintf(stderr, "daybook-admin rebuild: DAYBOOK_REBUILD_HELD_MAX must be a number "
				"from 1 to 100000000\n");
		return CLI_EXIT_USAGE;
	}
	return 0;
}

int admin_rebuild(struct admin_ctx *ctx, int argc, char **argv)
{
	struct rebuild rb = { .ctx = ctx, .phase = "load", .failure = CLI_EXIT_PROBLEM };
	struct sigaction sa = { .sa_handler = on_signal };
	char checkpoint[64];
	const char *what;
	bool ok, done = false;
	double secs;
	int rc = parse_target(argc, argv, &rb, &done);

	if (rc != CLI_EXIT_OK || done)
		return rc;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	rb.tty = isatty(STDERR_FILENO);
	rb.started = now();
	ok = prepare(&rb) && load(&rb);
	rb.loaded = now();
	ok = ok && index_and_send(&rb);
	rb.indexed = now();
	ok = ok && !interrupted && switch_over(&rb);
	rb.switched = now();
	report(&rb, true);
	if (!ok) {
		abandon(&rb);
		finish(&rb);
		return interrupted ? 130 : rb.failure;
	}
	if (rb.redis)
		cleanup_after_switch(&rb);
	secs = now() - rb.started;
	what = rb.sql && rb.redis ? "sql and redis" : rb.sql ? "sql" : "redis";
	snprintf(checkpoint, sizeof(checkpoint), "%llu.%lld", (unsigned long long)rb.cp_txid,
		 rb.position);
	if (rb.tty)
		printf("rebuilt %s from %lld events in %.2f s (%.0f events/s; load %.2f s, index "
		       "%.2f s, switch %.2f s, cleanup %.2f s); checkpoint %s\n",
		       what, rb.done, secs, rb.done / (secs + 1e-9), rb.loaded - rb.started,
		       rb.indexed - rb.loaded, rb.switched - rb.indexed, now() - rb.switched,
		       checkpoint);
	else
		json_line(json_pack("{s:s, s:I, s:I, s:f, s:f, s:s, s:f, s:f, s:f, s:f, s:f, s:s}",
				    "phase", "done", "done", (json_int_t)rb.done, "total",
				    (json_int_t)rb.total, "events_per_s", rb.done / (secs + 1e-9),
				    "eta_s", 0.0, "rebuilt", what, "seconds", secs, "load_s",
				    rb.loaded - rb.started, "index_s", rb.indexed - rb.loaded,
				    "switch_s", rb.switched - rb.indexed, "cleanup_s",
				    now() - rb.switched, "checkpoint", checkpoint));
	finish(&rb);
	return CLI_EXIT_OK;
}
