/* daybook-admin verify: reading Redis (pipelined checks, the live generation, orphan keys). */
#include <errno.h>
#include <event2/buffer.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "pg.h"
#include "verify.h"

const char *verify_reply_str(const redisReply *r)
{
	return r && r->type == REDIS_REPLY_STRING ? r->str : NULL;
}

void verify_redis_lost(struct verify *v)
{
	verify_fail(v, "redis: %s\n", v->redis->errstr[0] ? v->redis->errstr : "unexpected reply");
	redisFree(v->redis);
	v->redis = NULL;
}

void pending_free(struct pending *p)
{
	free(p->json);
	for (size_t i = 0; i < p->nitems; i++)
		free(p->items[i]);
	memset(p, 0, sizeof(*p));
}

/* The account's statement items in Redis (a list, newest first) against the newest
 * folded ones, by version. */
static void check_redis_items(struct verify *v, const struct pending *p, const redisReply *l)
{
	size_t i = 0, j = 0, nl = l && l->type == REDIS_REPLY_ARRAY ? l->elements : 0;
	char entity[128];

	if (nl == 0 && p->nitems > 0) { /* the whole key is gone: one difference */
		snprintf(entity, sizeof(entity), "stmt:%s", p->id);
		verify_diff(v, "redis", entity, "key", "present", "absent");
		return;
	}
	while (i < p->nitems || j < nl) { /* both oldest first */
		long long want = i < p->nitems ? p->item_versions[i] : LLONG_MAX;
		const char *member = j < nl ? verify_reply_str(l->element[nl - 1 - j]) : NULL;
		long long got = j < nl ? readmodel_item_version(member) : LLONG_MAX;
		const char *want_text, *got_text;

		snprintf(entity, sizeof(entity), "entry:%s/%lld", p->id, want < got ? want : got);
		want_text = want <= got ? p->items[i] : NULL;
		got_text = got <= want ? (member ? member : "") : NULL;
		if (!want_text || !got_text || strcmp(want_text, got_text) != 0)
			verify_diff(v, "redis", entity, "item", want_text ? want_text : "absent",
				    got_text ? got_text : "absent");
		i += want <= got;
		j += got <= want;
	}
}

/* A version as Redis holds it: false unless it is a decimal number and nothing else. */
static bool version_of(const char *text, long long *out)
{
	char *end;

	errno = 0;
	*out = strtoll(text, &end, 10);
	return errno == 0 && end != text && *end == '\0';
}

/* HMGET acct v n j and LRANGE stmt (read in one step) against the folded account. A
 * version past the folded one is the projector's since the snapshot: it is left to
 * confirm_ahead, which looks it up in the log as it is now. */
static void check_redis_account(struct verify *v, struct pending *p, const redisReply *h,
				const redisReply *z)
{
	char entity[96];
	const char *version;
	long long found;

	snprintf(entity, sizeof(entity), "account:%s", p->id);
	if (!h || h->type != REDIS_REPLY_ARRAY || h->elements != 3) {
		verify_diff(v, "redis", entity, "key", "a hash",
			    h && h->type == REDIS_REPLY_ERROR ? h->str : "another reply");
		return;
	}
	version = verify_reply_str(h->element[0]);
	if (!version) {
		verify_diff(v, "redis", entity, "key", "present", "absent");
		return;
	}
	if (version_of(version, &found) && found > p->version) {
		p->ahead = found;
		return;
	}
	verify_field_int(v, "redis", entity, "version", p->version, version);
	if (atoll(version) < p->version)
		return; /* stale: one difference says it */
	verify_field_int(v, "redis", entity, "entries", p->entries,
			 verify_reply_str(h->element[1]));
	verify_field(v, "redis", entity, "body", p->json, verify_reply_str(h->element[2]));
	check_redis_items(v, p, z);
}

static void check_redis_transfer(struct verify *v, const struct pending *p, const redisReply *r)
{
	char entity[96];

	snprintf(entity, sizeof(entity), "transfer:%s", p->id);
	if (!verify_reply_str(r))
		verify_diff(v, "redis", entity, "key", "present", "absent");
	else
		verify_field(v, "redis", entity, "body", p->json, r->str);
}

/* The live generation's key of `kind` (and id) into k, which it returns. */
static const char *vkey(const struct verify *v, char k[READMODEL_KEY_MAX], const char *kind,
			const char *id)
{
	readmodel_key_text(k, READMODEL_KEY_MAX, v->gen, kind, id);
	return k;
}

/* An account's hash and statement are read in one MULTI/EXEC: the projector writes
 * both in one script, and two separate reads could see its version from before a batch
 * and an item from after it (a false difference). */
static int append_account(struct verify *v, const char *id)
{
	char k[READMODEL_KEY_MAX];

	if (redisAppendCommand(v->redis, "MULTI") != REDIS_OK ||
	    redisAppendCommand(v->redis, "HMGET %s v n j",
			       vkey(v, k, READMODEL_KIND_ACCOUNT, id)) != REDIS_OK ||
	    redisAppendCommand(v->redis, "LRANGE %s 0 -1",
			       vkey(v, k, READMODEL_KIND_STATEMENT, id)) != REDIS_OK)
		return REDIS_ERR;
	return redisAppendCommand(v->redis, "EXEC");
}

static bool append_checks(struct verify *v)
{
	char k[READMODEL_KEY_MAX];

	for (size_t i = 0; i < v->npending; i++) {
		const struct pending *p = &v->pending[i];
		int rc = p->transfer
				 ? redisAppendCommand(v->redis, "GET %s",
						      vkey(v, k, READMODEL_KIND_TRANSFER, p->id))
				 : append_account(v, p->id);
		if (rc != REDIS_OK)
			return false;
	}
	return true;
}

/* The replies of append_account: MULTI's, two QUEUED, then EXEC's (the hash and the
 * list, or an error). *exec is the reply to free. */
static bool read_account(struct verify *v, redisReply **exec)
{
	for (int i = 0; i < 4; i++) {
		void *r = NULL;
		if (redisGetReply(v->redis, &r) != REDIS_OK)
			return false;
		if (i < 3)
			freeReplyObject(r);
		else
			*exec = r;
	}
	return true;
}

#define VERSION_MISSING                                                                            \
	"SELECT n.id FROM unnest($1::text[], $2::bigint[]) n(id, v) WHERE NOT EXISTS "             \
	"(SELECT 1 FROM events e WHERE e.stream = 'account-' || n.id AND e.version = n.v)"

/* The accounts of the chunk that Redis holds at a version past the snapshot's: each
 * version must be one of the log as it is now (one query for the chunk), since the
 * projector writes Redis only after the events commit. One the log does not have
 * (Redis restored, or written, from another history) is a difference. */
static void confirm_ahead(struct verify *v)
{
	struct evbuffer *ids = evbuffer_new(), *versions = evbuffer_new();
	const char *params[2];
	char version[24], entity[96], want[48];
	size_t n = 0;
	PGresult *r = NULL;

	if (!ids || !versions) {
		verify_fail(v, "out of memory\n");
		goto done;
	}
	evbuffer_add(ids, "{", 1);
	evbuffer_add(versions, "{", 1);
	for (size_t i = 0; i < v->npending; i++) {
		if (!v->pending[i].ahead)
			continue;
		snprintf(version, sizeof(version), "%lld", v->pending[i].ahead);
		pg_array_append(ids, v->pending[i].id, n == 0);
		pg_array_append(versions, version, n++ == 0);
	}
	if (n == 0)
		goto done;
	evbuffer_add(ids, "}", 2);
	evbuffer_add(versions, "}", 2);
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	params[1] = (const char *)evbuffer_pullup(versions, -1);
	r = verify_now(v, VERSION_MISSING, 2, params);
	v->newer += n - (r ? (size_t)PQntuples(r) : 0);
	for (int row = 0; r && row < PQntuples(r); row++) {
		for (size_t i = 0; i < v->npending; i++) {
			const struct pending *p = &v->pending[i];
			if (!p->ahead || strcmp(p->id, PQgetvalue(r, row, 0)) != 0)
				continue;
			snprintf(entity, sizeof(entity), "account:%s", p->id);
			snprintf(want, sizeof(want), "%d or a later version in the log",
				 p->version);
			snprintf(version, sizeof(version), "%lld", p->ahead);
			verify_diff(v, "redis", entity, "version", want, version);
		}
	}
done:
	PQclear(r);
	if (ids)
		evbuffer_free(ids);
	if (versions)
		evbuffer_free(versions);
}

/* Send the pending checks in one pipeline, then compare their replies. */
void verify_redis_flush(struct verify *v)
{
	if (!v->redis)
		goto done;
	if (!append_checks(v))
		goto fail;
	for (size_t i = 0; i < v->npending; i++) {
		struct pending *p = &v->pending[i];
		redisReply *a = NULL;
		bool read = p->transfer ? redisGetReply(v->redis, (void **)&a) == REDIS_OK
					: read_account(v, &a);
		bool pair = a && a->type == REDIS_REPLY_ARRAY && a->elements == 2;
		if (read && p->transfer)
			check_redis_transfer(v, p, a);
		else if (read) /* EXEC's error (EXECABORT) stands in for the hash */
			check_redis_account(v, p, pair ? a->element[0] : a,
					    pair ? a->element[1] : NULL);
		if (a)
			freeReplyObject(a);
		if (!read)
			goto fail;
	}
	confirm_ahead(v);
	goto done;
fail:
	verify_redis_lost(v);
done:
	for (size_t i = 0; i < v->npending; i++)
		pending_free(&v->pending[i]);
	v->npending = 0;
}

struct pending *pending_add(struct verify *v)
{
	if (v->npending == REDIS_CHUNK)
		verify_redis_flush(v);
	return &v->pending[v->npending++];
}

/* The live generation's checkpoint compared with the snapshot's: <0 behind. The
 * checkpoint's text goes into token ("" when there is none). */
static int redis_checkpoint_cmp(struct verify *v, char token[48])
{
	char k[READMODEL_KEY_MAX];
	redisReply *r = redisCommand(v->redis, "GET %s",
				     vkey(v, k, READMODEL_KIND_CHECKPOINT, NULL));
	struct readmodel_position p = { 0, 0 };
	int c;

	token[0] = '\0';
	if (!r)
		return 0; /* the connection failed: the checks will say so */
	if (!verify_reply_str(r) || !readmodel_position_parse(r->str, &p))
		p = (struct readmodel_position){ 0, 0 };
	else
		snprintf(token, 48, "%s", r->str);
	c = readmodel_position_cmp(&p, &v->cp);
	freeReplyObject(r);
	return c;
}

/* A checkpoint past the snapshot's is the projector's since then, if it is an event
 * of the log as it is now; one that is not (Redis restored, or written, from another
 * history) is a difference. */
static void check_checkpoint_ahead(struct verify *v, const char *token)
{
	char want[96];

	if (verify_event_in_log(v, token) || v->failed)
		return;
	snprintf(want, sizeof(want), "%s or a later event in the log", v->cp_token);
	verify_diff(v, "redis", "live", "checkpoint", want, token);
}

/* Name (on stderr) every generation built from another event store, other than the
 * live one: nothing of ours uses them, and nothing of ours deletes them, since they
 * may be another deployment's (docs/operations.md). */
static void note_foreign_generations(struct verify *v, const char *ours)
{
	char cursor[32] = "0";

	do {
		redisReply *r = redisCommand(v->redis, "SCAN %s MATCH %s COUNT 1000", cursor,
					     READMODEL_GEN_PREFIX "*:" READMODEL_KIND_IDENTITY);
		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
			freeReplyObject(r);
			return; /* the checks that follow report a lost connection */
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; i < r->element[1]->elements; i++) {
			const char *k = r->element[1]->element[i]->str;
			long long gen = readmodel_key_generation(k);
			redisReply *id = redisCommand(v->redis, "GET %s", k);
			if (id && verify_reply_str(id) && strcmp(id->str, ours) != 0 &&
			    gen != atoll(v->gen))
				log_warn(v->log,
					 "redis generation %lld was "
					 "built from another event store (identity %s): unused here, "
					 "and left in place",
					 gen, id->str);
			freeReplyObject(id);
		}
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
}

/* Was the live generation built from this event store? One that was not (another
 * deployment's, or one of an earlier life of this database) is never served nor
 * adopted: it is one difference, and its content is not compared. */
static bool redis_identity_ours(struct verify *v)
{
	char k[READMODEL_KEY_MAX];
	PGresult *q = PQexec(v->pg, READMODEL_IDENTITY_SQL);
	redisReply *r;
	bool ok = PQresultStatus(q) == PGRES_TUPLES_OK && PQntuples(q) == 1 &&
		  !PQgetisnull(q, 0, 0);

	if (!ok) {
		verify_fail(v, "reading the event store's identity (is the database migrated?): %s",
			    PQresultErrorMessage(q));
		PQclear(q);
		return false;
	}
	note_foreign_generations(v, PQgetvalue(q, 0, 0));
	r = redisCommand(v->redis, "GET %s", vkey(v, k, READMODEL_KIND_IDENTITY, NULL));
	if (!r) {
		PQclear(q);
		verify_redis_lost(v);
		return false;
	}
	ok = verify_reply_str(r) && strcmp(r->str, PQgetvalue(q, 0, 0)) == 0;
	if (!ok) {
		verify_diff(v, "redis", "live", "identity", PQgetvalue(q, 0, 0),
			    verify_reply_str(r) ? r->str : "absent");
		log_warn(v->log,
			 "redis generation %s was not built from "
			 "this event store: it is not served, and its content is not checked",
			 v->gen);
		snprintf(v->foreign, sizeof(v->foreign), "%s", v->gen);
		v->gen[0] = '\0';
		redisFree(v->redis);
		v->redis = NULL;
	}
	freeReplyObject(r);
	PQclear(q);
	return ok;
}

/* Find the live generation; give the projector a moment to bring Redis up to the
 * snapshot, since it writes each batch to Redis together with its SQL transaction
 * (Redis may be a batch ahead of the snapshot, or behind it). */
void verify_redis_prepare(struct verify *v)
{
	char k[READMODEL_KEY_MAX], token[48];
	int c;
	redisReply *r = redisCommand(v->redis, "GET " READMODEL_LIVE_KEY);
	struct timespec pause = { 0, 50 * 1000 * 1000 };

	if (!r) {
		verify_redis_lost(v);
		return;
	}
	if (!verify_reply_str(r)) {
		verify_diff(v, "redis", "live", "generation", "present", "absent");
		freeReplyObject(r);
		redisFree(v->redis);
		v->redis = NULL;
		return;
	}
	snprintf(v->gen, sizeof(v->gen), "%s", r->str);
	freeReplyObject(r);
	if (!redis_identity_ours(v))
		return;
	r = redisCommand(v->redis, "GET %s", vkey(v, k, READMODEL_KIND_LAYOUT, NULL));
	if (r && !(verify_reply_str(r) && strcmp(r->str, READMODEL_REDIS_LAYOUT) == 0))
		verify_diff(v, "redis", "live", "layout", READMODEL_REDIS_LAYOUT,
			    verify_reply_str(r) ? r->str : "absent");
	freeReplyObject(r);
	for (int i = 0; i < (int)(REDIS_WAIT_SECONDS * 20) && redis_checkpoint_cmp(v, token) < 0;
	     i++)
		nanosleep(&pause, NULL);
	c = redis_checkpoint_cmp(v, token);
	if (c < 0)
		log_warn(v->log,
			 "redis generation %s is behind the SQL "
			 "checkpoint %s",
			 v->gen, v->cp_token);
	else if (c > 0)
		check_checkpoint_ahead(v, token);
}

/* A switch of generation during the run (a rebuild or a resync) explains Redis
 * differences that a second run would not find. */
void verify_redis_recheck_live(struct verify *v)
{
	redisReply *r = redisCommand(v->redis, "GET " READMODEL_LIVE_KEY);

	if (r && !(verify_reply_str(r) && strcmp(r->str, v->gen) == 0))
		log_warn(v->log,
			 "the live generation changed from %s to %s "
			 "during the run: Redis differences may come from the switch; run verify "
			 "again",
			 v->gen, verify_reply_str(r) ? r->str : "(none)");
	if (r)
		freeReplyObject(r);
}

#define ORPHAN_PAGE 1000

#define ORPHANS_REMEMBERED 100000

/* SCAN may return a key more than once (while Redis rehashes): each orphan is
 * reported once, for the first ORPHANS_REMEMBERED of them. */
static void orphan_diff(struct verify *v, const char *entity)
{
	if (v->orphans && strmap_get(v->orphans, entity))
		return;
	if (v->orphans && strmap_count(v->orphans) < ORPHANS_REMEMBERED &&
	    !strmap_put(v->orphans, entity, v->orphans))
		verify_fail(v, "out of memory\n");
	verify_diff(v, "redis", entity, "key", "absent", "present");
}

/* Keys of the live generation to look up: each key's kind and id. */
struct orphan_page {
	const char *kind[ORPHAN_PAGE], *id[ORPHAN_PAGE];
	size_t n;
};

/* The ids of one kind in the page that the log has no events for, each reported
 * once per key. The log is read as it is now, not at the snapshot: the projector
 * writes Redis after the events commit, so a key without its events is an orphan, not
 * a newcomer. (The SQL models are no reference here: they may be what is broken.) */
static void orphans_of(struct verify *v, const struct orphan_page *page, const char *kind,
		       const char *query)
{
	struct evbuffer *ids = evbuffer_new();
	const char *params[1];
	size_t n = 0;
	PGresult *r;

	if (!ids)
		return;
	evbuffer_add(ids, "{", 1);
	for (size_t i = 0; i < page->n; i++)
		if (strcmp(page->kind[i], kind) == 0)
			pg_array_append(ids, page->id[i], n++ == 0);
	evbuffer_add(ids, "}", 2);
	params[0] = (const char *)evbuffer_pullup(ids, -1);
	r = n ? PQexecParams(v->pg, query, 1, NULL, params, NULL, NULL, 0) : NULL;
	if (r && PQresultStatus(r) != PGRES_TUPLES_OK)
		verify_fail(v, "looking up redis keys: %s", PQresultErrorMessage(r));
	for (int row = 0; r && PQresultStatus(r) == PGRES_TUPLES_OK && row < PQntuples(r); row++) {
		for (size_t i = 0; i < page->n; i++) {
			char entity[LEDGER_ID_MAX + 32];
			if (strcmp(page->kind[i], kind) != 0 ||
			    strcmp(page->id[i], PQgetvalue(r, row, 0)) != 0)
				continue;
			snprintf(entity, sizeof(entity), "%s:%s",
				 strcmp(kind, READMODEL_KIND_TRANSFER) == 0  ? "transfer"
				 : strcmp(kind, READMODEL_KIND_ACCOUNT) == 0 ? "account"
									     : kind,
				 page->id[i]);
			orphan_diff(v, entity);
		}
	}
	PQclear(r);
	evbuffer_free(ids);
}

/* Sort the page's keys: an account's hash or statement, a transfer, the generation's
 * own keys, or something that has no business in the generation (an id that no
 * event could carry included). */
static void classify(struct verify *v, struct orphan_page *page, char *key, size_t prefix)
{
	static const char *const kinds[] = { READMODEL_KIND_ACCOUNT, READMODEL_KIND_STATEMENT,
					     READMODEL_KIND_TRANSFER };
	char *rest = key + prefix, *colon = strchr(rest, ':');

	if (strcmp(rest, READMODEL_KIND_TOTALS) == 0 ||
	    strcmp(rest, READMODEL_KIND_CHECKPOINT) == 0 ||
	    strcmp(rest, READMODEL_KIND_LAYOUT) == 0 || strcmp(rest, READMODEL_KIND_IDENTITY) == 0)
		return;
	for (size_t k = 0; colon && k < sizeof(kinds) / sizeof(kinds[0]); k++) {
		if ((size_t)(colon - rest) == strlen(kinds[k]) &&
		    strncmp(rest, kinds[k], strlen(kinds[k])) == 0 && ledger_valid_id(colon + 1)) {
			page->kind[page->n] = kinds[k];
			page->id[page->n++] = colon + 1;
			return;
		}
	}
	char entity[600];
	snprintf(entity, sizeof(entity), "key:%s", key);
	orphan_diff(v, entity);
}

#define ACCOUNT_MISSING                                                                            \
	"SELECT id FROM unnest($1::text[]) id WHERE NOT EXISTS "                                   \
	"(SELECT 1 FROM events WHERE stream = 'account-' || id)"

/* Every key of the live generation, a SCAN page at a time (memory stays bounded). */
void verify_pass_redis_orphans(struct verify *v)
{
	char cursor[32] = "0", match[48];
	size_t prefix;

	readmodel_key_text(match, sizeof(match), v->gen, "*", NULL);
	prefix = strlen(match) - 1;
	if (strmap_open(&v->orphans, NULL) != 0) {
		verify_fail(v, "out of memory\n");
		return;
	}
	do {
		redisReply *r = redisCommand(v->redis, "SCAN %s MATCH %s COUNT %d", cursor, match,
					     ORPHAN_PAGE);
		size_t i = 0;

		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
			freeReplyObject(r);
			verify_redis_lost(v);
			break;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		while (i < r->element[1]->elements) { /* SCAN may return more than COUNT */
			struct orphan_page page = { .n = 0 };
			for (; i < r->element[1]->elements && page.n < ORPHAN_PAGE; i++)
				classify(v, &page, r->element[1]->element[i]->str, prefix);
			orphans_of(v, &page, READMODEL_KIND_ACCOUNT, ACCOUNT_MISSING);
			orphans_of(v, &page, READMODEL_KIND_STATEMENT, ACCOUNT_MISSING);
			orphans_of(v, &page, READMODEL_KIND_TRANSFER,
				   "SELECT id FROM unnest($1::text[]) id WHERE NOT "
				   "EXISTS (SELECT 1 FROM events WHERE type = 'TransferSent' "
				   "AND data->>'transfer_id' = id)");
		}
		freeReplyObject(r);
	} while (!v->failed && strcmp(cursor, "0") != 0);
	strmap_close(&v->orphans);
}
