/* Deciding a batch: the account cache (committed state), the batch's overlay of it,
 * and each command decided by the domain's rules (shared/ledger.h) into events and an
 * outcome. See batch.h. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

/* acc zeroed ("does not exist") with this id (cut at LEDGER_ID_MAX, as ids never are). */
static void account_init(struct ledger_account *acc, const char *id)
{
	size_t n = strnlen(id, sizeof(acc->id) - 1);

	memset(acc, 0, sizeof(*acc));
	memcpy(acc->id, id, n);
}

struct ledger_account *account_new(const char *id)
{
	struct ledger_account *acc = malloc(sizeof(*acc));

	if (acc)
		account_init(acc, id);
	return acc;
}

size_t cmd_accounts(const struct cmd *cmd, const char *ids[2])
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

void cache_prefetch(struct batcher *b)
{
	uint64_t hashes[2 * BATCH_MAX];
	size_t n = 0;

	for (size_t i = 0; i < b->nslots; i++) {
		const char *ids[2];
		size_t k = cmd_accounts(b->slots[i].cmd, ids);
		for (size_t j = 0; j < k; j++)
			hashes[n++] = strmap_hash(b->cache, ids[j]);
	}
	for (int stage = 0; stage < 2; stage++)
		for (size_t i = 0; i < n; i++)
			strmap_prefetch(b->cache, hashes[i], stage);
}

/* Forget cached state the batch may have changed: after a failure, what committed is
 * unknown or was refused, and the log is the only truth. */
void invalidate(struct batcher *b)
{
	for (size_t i = 0; i < b->nslots; i++) {
		const char *ids[2];
		size_t n = cmd_accounts(b->slots[i].cmd, ids);
		for (size_t j = 0; j < n; j++)
			strmap_remove(b->cache, ids[j]);
	}
}

/* This batch's view of an account: the overlay, else a copy of the cache, else
 * a fresh "does not exist" (the load phase fetched every account the cache lacks).
 * The overlay's accounts are the batch's own array (a command touches at most two). */
static struct ledger_account *view(struct batcher *b, const char *id)
{
	struct ledger_account *acc = strmap_get(b->overlay, id), *cached;

	if (acc)
		return acc;
	if (b->noverlay == sizeof(b->overlay_accounts) / sizeof(b->overlay_accounts[0]))
		return NULL; /* cannot be: BATCH_MAX commands of at most two accounts */
	acc = &b->overlay_accounts[b->noverlay];
	cached = strmap_get(b->cache, id);
	if (cached)
		*acc = *cached;
	else
		account_init(acc, id);
	if (!strmap_put(b->overlay, id, acc))
		return NULL;
	b->noverlay++;
	return acc;
}

/* The event's metadata, as JSON text appended to t. */
static void metadata_text(const struct cmd *cmd, struct ledger_text *t)
{
	ledger_text_raw(t, "{\"request_id\":", 14);
	ledger_text_string(t, cmd->request_id);
	ledger_text_raw(t, ",\"token_id\":", 12);
	ledger_text_string(t, cmd->token_id);
	ledger_text_raw(t, ",\"time\":", 8);
	ledger_text_string(t, cmd->time);
	if (cmd->idem_key[0]) {
		ledger_text_raw(t, ",\"idempotency_key\":", 19);
		ledger_text_string(t, cmd->idem_key);
	}
	ledger_text_raw(t, "}", 2); /* with the NUL */
}

char *account_state_text(const struct ledger_account *acc)
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

	if (!ledger_evolve(acc, ev))
		return false;
	/* Both texts go into the batch's one buffer: no allocation per event. */
	pe->data = b->text.len;
	if (!ledger_event_data_text(ev, &b->text))
		return false;
	ledger_text_raw(&b->text, "", 1);
	pe->metadata = b->text.len;
	metadata_text(b->slots[slot].cmd, &b->text);
	pe->snapshot = acc->version % SNAPSHOT_EVERY == 0 ? account_state_text(acc) : NULL;
	if (b->text.failed || (acc->version % SNAPSHOT_EVERY == 0 && !pe->snapshot)) {
		free(pe->snapshot);
		return false;
	}
	memcpy(pe->stream, "account-", 8);
	memcpy(pe->stream + 8, acc->id, strlen(acc->id) + 1);
	http_format_u64(pe->version, (unsigned long long)acc->version); /* >= 1 */
	pe->type = ledger_event_name(ev->type);
	pe->slot = slot;
	b->slots[slot].last_event = (int)b->nevents++;
	return true;
}

/* Room left after a body's text for the rest of it: a position ("txid.position": two
 * 64-bit numbers and a dot) and the closing "}. */
#define POSITION_ROOM 48

/* Start slot i's answer as text (see struct slot): the body's text goes on from here. */
static void text_begin(struct batcher *b, int i)
{
	struct slot *s = &b->slots[i];

	s->text = true;
	s->etag = s->location = 0;
	if (b->text.len == 0)
		ledger_text_raw(&b->text, "", 1); /* so that no value starts at 0 */
	s->ok_body = b->text.len;
}

/* End the body's text after "position":" and leave room for the rest. */
static void text_end(struct batcher *b, int i)
{
	static const char room[POSITION_ROOM] = { 0 };
	struct slot *s = &b->slots[i];

	ledger_text_raw(&b->text, ",\"position\":\"", 13);
	s->ok_len = b->text.len - s->ok_body;
	ledger_text_raw(&b->text, room, sizeof(room));
}

/* A header's value: prefix and the id or version, NUL-terminated; its offset. */
static size_t header_value(struct batcher *b, const char *prefix, const char *id, int64_t version,
			   const char *suffix)
{
	size_t at = b->text.len;

	ledger_text_raw(&b->text, prefix, strlen(prefix));
	if (id)
		ledger_text_raw(&b->text, id, strlen(id));
	else
		ledger_text_int(&b->text, version);
	ledger_text_raw(&b->text, suffix, strlen(suffix) + 1);
	return at;
}

const char *slot_body(struct batcher *b, const struct slot *s, const char *position, size_t *len)
{
	char *body = b->text.p + s->ok_body, *p = body + s->ok_len;
	size_t n = strlen(position);

	if (n > POSITION_ROOM - 3)
		n = 0; /* cannot be: a position is two numbers */
	memcpy(p, position, n);
	memcpy(p + n, "\"}", 3);
	*len = s->ok_len + n + 2;
	return body;
}

static void set_refusal(struct slot *s, enum ledger_error err, const char *detail)
{
	s->status = ledger_error_status(err);
	s->body = http_problem_json(s->status, ledger_error_code(err), ledger_error_title(err),
				    detail);
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

	if (!from || !to)
		return false;
	if (strmap_get(b->transfers, t->id)) {
		*err = LEDGER_TRANSFER_EXISTS;
		return true;
	}
	*err = ledger_decide_transfer(from, to, t->id, t->amount, t->reference, ev);
	*blame = !ledger_account_exists(from) || from->closed || *err == LEDGER_INSUFFICIENT_FUNDS
			 ? from
			 : to;
	if (*err)
		return true;
	if (!add_event(b, i, from, &ev[0]) || !add_event(b, i, to, &ev[1]) ||
	    !strmap_put(b->transfers, t->id, b))
		return false;
	/* {"transfer_id","from_version","to_version","position"}; the Location is the
	 * transfer as the query API serves it (ids are [A-Za-z0-9._:-]: no escaping). */
	text_begin(b, i);
	ledger_text_raw(&b->text, "{\"transfer_id\":", 15);
	ledger_text_string(&b->text, t->id);
	ledger_text_raw(&b->text, ",\"from_version\":", 16);
	ledger_text_int(&b->text, from->version);
	ledger_text_raw(&b->text, ",\"to_version\":", 14);
	ledger_text_int(&b->text, to->version);
	text_end(b, i);
	b->slots[i].location = header_value(b, "/transfers/", t->id, 0, "");
	return !b->text.failed;
}

/* Decide slot i's command on one account: as decide_transfer. */
static bool decide_account(struct batcher *b, int i, enum ledger_error *err,
			   struct ledger_account **blame)
{
	struct cmd *cmd = b->slots[i].cmd;
	const char *id = cmd->kind == CMD_OPEN ? cmd->u.open.id : cmd->account;
	struct ledger_account *acc = view(b, id);
	struct ledger_event ev;

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
	/* {"account_id","version","balance"?,"position"} */
	text_begin(b, i);
	ledger_text_raw(&b->text, "{\"account_id\":", 14);
	ledger_text_string(&b->text, id);
	ledger_text_raw(&b->text, ",\"version\":", 11);
	ledger_text_int(&b->text, acc->version);
	if (cmd->kind == CMD_DEPOSIT || cmd->kind == CMD_WITHDRAW) {
		ledger_text_raw(&b->text, ",\"balance\":", 11);
		ledger_text_int(&b->text, acc->balance);
	}
	text_end(b, i);
	b->slots[i].etag = header_value(b, "\"", NULL, acc->version, "\"");
	if (cmd->kind == CMD_OPEN)
		b->slots[i].location = header_value(b, "/accounts/", id, 0, "");
	return !b->text.failed;
}

bool decide(struct batcher *b, int i)
{
	struct slot *s = &b->slots[i];
	struct ledger_account *blame = NULL;
	enum ledger_error err = LEDGER_OK;
	char detail[256];

	s->last_event = -1;
	s->text = false;
	if (!(s->cmd->kind == CMD_TRANSFER ? decide_transfer(b, i, &err, &blame)
					   : decide_account(b, i, &err, &blame)))
		return false;
	if (err == LEDGER_OK) {
		s->status = 201;
		return true;
	}
	refusal_detail(s->cmd, err, blame, detail, sizeof(detail));
	set_refusal(s, err, detail);
	return true;
}

void commit_overlay(struct batcher *b)
{
	if (strmap_count(b->cache) + strmap_count(b->overlay) > CACHE_MAX)
		strmap_clear(b->cache); /* crude bound on memory; cold accounts reload */
	cache_prefetch(b);
	for (size_t i = 0; i < b->nevents; i++) {
		const char *id = b->events[i].stream + strlen("account-");
		struct ledger_account *acc = strmap_get(b->overlay, id), *cached, *copy;
		if (!acc)
			continue;
		/* The overlay's accounts are copies: an account already cached is updated in
		 * place (no pointer into the cache outlives a batch). */
		cached = strmap_get(b->cache, id);
		if (cached) {
			*cached = *acc;
			continue;
		}
		copy = malloc(sizeof(*copy));
		if (!copy)
			continue;
		*copy = *acc;
		if (!strmap_put(b->cache, id, copy))
			free(copy);
	}
}
