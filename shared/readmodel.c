/* The read models' JSON bodies and position tokens, shared by projector and query. */
#include "readmodel.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static char *dump(json_t *o)
{
	char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;

	json_decref(o);
	return text;
}

char *readmodel_account_json(const struct readmodel_account *a)
{
	return dump(json_pack("{s:s, s:s, s:s, s:I, s:I, s:s, s:I, s:s, s:s}", "account_id",
			      a->account_id, "name", a->name, "currency", a->currency, "balance",
			      (json_int_t)a->balance, "overdraft_limit", (json_int_t)a->overdraft_limit,
			      "status", a->status, "version", (json_int_t)a->version, "opened_at",
			      a->opened_at, "updated_at", a->updated_at));
}

char *readmodel_entry_json(const struct readmodel_entry *e)
{
	json_t *o = json_pack("{s:I, s:s, s:I, s:I}", "version", (json_int_t)e->version, "type",
			      e->type, "amount", (json_int_t)e->amount, "balance_after",
			      (json_int_t)e->balance_after);

	if (o && e->transfer_id)
		json_object_set_new(o, "transfer_id", json_string(e->transfer_id));
	if (o && e->counterparty)
		json_object_set_new(o, "counterparty", json_string(e->counterparty));
	if (o && e->reference)
		json_object_set_new(o, "reference", json_string(e->reference));
	if (o)
		json_object_set_new(o, "at", json_string(e->at));
	return dump(o);
}

char *readmodel_transfer_json(const struct readmodel_transfer *t)
{
	return dump(json_pack("{s:s, s:s, s:s, s:I, s:s, s:s?, s:s}", "transfer_id", t->transfer_id,
			      "from", t->from, "to", t->to, "amount", (json_int_t)t->amount,
			      "currency", t->currency, "reference", t->reference, "at", t->at));
}

static bool parse_u64(const char *s, size_t n, uint64_t *out)
{
	uint64_t v = 0;

	if (n == 0 || n > 19)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

bool readmodel_position_parse(const char *text, struct readmodel_position *out)
{
	const char *dot = text ? strchr(text, '.') : NULL;

	return dot && parse_u64(text, (size_t)(dot - text), &out->txid) &&
	       parse_u64(dot + 1, strlen(dot + 1), &out->position);
}

int readmodel_position_cmp(const struct readmodel_position *a, const struct readmodel_position *b)
{
	if (a->txid != b->txid)
		return a->txid < b->txid ? -1 : 1;
	if (a->position != b->position)
		return a->position < b->position ? -1 : 1;
	return 0;
}

const char *readmodel_entry_type(enum ledger_event_type type)
{
	switch (type) {
	case LEDGER_FUNDS_DEPOSITED: return "deposit";
	case LEDGER_FUNDS_WITHDRAWN: return "withdrawal";
	case LEDGER_TRANSFER_RECEIVED: return "transfer_in";
	case LEDGER_TRANSFER_SENT: return "transfer_out";
	default: return NULL;
	}
}

void readmodel_int128_text(__int128 v, char out[48])
{
	char tmp[48];
	size_t n = 0, i = 0;
	unsigned __int128 u = v < 0 ? -(unsigned __int128)v : (unsigned __int128)v;

	do {
		tmp[n++] = (char)('0' + (int)(u % 10));
		u /= 10;
	} while (u);
	if (v < 0)
		out[i++] = '-';
	while (n)
		out[i++] = tmp[--n];
	out[i] = '\0';
}
