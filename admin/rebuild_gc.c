/* daybook-admin rebuild: deleting the Redis generations the switch left behind. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rebuild.h"

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
		rb_note(rb,
			"redis generation %lld was built from another "
			"event store (identity %s): left in place\n",
			gen, r->str);
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

/* Delete every key of the generations below `keep` (0: delete generation `drop`) that
 * are ours to delete. Newer ones are left alone, as the projector's sweep leaves them:
 * a rebuild may be filling one. */
void rb_redis_cleanup(struct rebuild *rb, long long keep, long long drop)
{
	char cursor[32] = "0", match[48];
	struct verdicts verdicts = { 0 };

	/* Replies of pipelined commands come first: read them before talking again. */
	if (!rb_redis_drain(rb))
		return;
	if (keep)
		snprintf(match, sizeof(match), "%s", READMODEL_GEN_MATCH);
	else
		readmodel_key_match(match, sizeof(match), drop);
	do {
		redisReply *r = redisCommand(rb->redis, "SCAN %s MATCH %s COUNT 10000", cursor,
					     match);
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
			if ((!keep || readmodel_key_generation(k) < keep) &&
			    sweep_key(rb, &verdicts, k))
				argv[argc++] = k;
		}
		if (argc > 1 && rb_redis_send(rb, argc, argv))
			(void)!rb_redis_drain(rb);
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
 * generation before, one sweep takes every older generation (not newer ones: a rebuild
 * may be filling one). */
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
		u->ok = rb_redis_send(u->rb, 1 + u->n, u->argv); /* hiredis copies the keys */
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
	bool same = r && r->type == REDIS_REPLY_STRING &&
		    strcmp(r->str, READMODEL_REDIS_LAYOUT) == 0;

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
		rb_redis_cleanup(rb, 0, gen);
		return;
	}
	*u = (struct unlinks){ .rb = rb, .gen = gen, .keys = u->keys, .ok = rb_redis_drain(rb) };
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
		(void)!rb_redis_drain(rb);
	free(u->keys);
	free(u);
}

/* Does a projector lead that will sweep the old generations? One holds the lease now
 * (sql/010: unexpired, its session alive) and has raised this store's fence in this
 * Redis to the lease's epoch: it writes here, and once it sees the switch (its next
 * batch, or its check of the live generation within a second) it sweeps every
 * generation older than the live one. A leader that dies before it has finished
 * leaves the sweep to the next one, which sweeps when it takes over
 * (projector/redis_sync.c). "Its session alive" is the lease's own test, which counts a
 * session it cannot see (no pid, a start time hidden from this role) as alive: a holder
 * that is in fact gone has a lease of at most its term left, and the next leader sweeps
 * when it takes over. Any other doubt (no leader, a leader that has not reached this
 * Redis yet, Redis restarted or failed over without the fence, an error): false, and
 * the rebuild deletes the old generation itself. */
static bool projector_sweeps(struct rebuild *rb)
{
	PGresult *r = PQexec(rb->wr, "SELECT epoch FROM projector_leases WHERE projection = 'sql' "
				     "AND holder <> '' AND expires_at > clock_timestamp() "
				     "AND projector_session_alive(holder_pid, holder_start)");
	redisReply *f = NULL;
	bool leads = false;

	if (PQresultStatus(r) != PGRES_TUPLES_OK)
		rb_note(rb,
			"cannot read the projector lease (%s): the old redis generation is "
			"deleted here",
			PQresultErrorMessage(r));
	else if (PQntuples(r) == 1 && rb_redis_drain(rb) &&
		 (f = redisCommand(rb->redis, "GET %s%s", READMODEL_LEADER_KEY, rb->identity)))
		leads = f->type == REDIS_REPLY_STRING && strcmp(f->str, PQgetvalue(r, 0, 0)) == 0;
	freeReplyObject(f);
	PQclear(r);
	return leads;
}

bool rb_cleanup_after_switch(struct rebuild *rb)
{
	const struct live_before *old = &rb->live_before;
	long long from = old->present ? atoll(old->gen) : 0;

	/* Handed over only when the generation replaced is older than ours: one above it
	 * (a projector's resync during a long rebuild took a higher number) would stay
	 * for good, since a sweep takes only generations below the live one. */
	if (from > 0 && from < rb->gen && projector_sweeps(rb))
		return false;
	if (from <= 0 || from >= rb->gen || rb->gen - from > 8) {
		rb_redis_cleanup(rb, rb->gen, 0);
		return true;
	}
	if (from == rb->gen - 1 && !rb->xfer_ids_full && rb_redis_drain(rb) &&
	    ours_to_delete(rb, from)) {
		delete_by_name(rb, from);
		return true;
	}
	for (long long g = from; g < rb->gen; g++)
		rb_redis_cleanup(rb, 0, g);
	return true;
}
