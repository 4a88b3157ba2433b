/* The fold from log events to read-model rows, shared by the projector, rebuild and
 * the query service's time travel: the pure domain's evolve decides every balance,
 * and this adds the read models' bookkeeping (name, statement items, totals). */
#include "readmodel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool readmodel_fold(struct readmodel_row *row, const char *id, int32_t version,
		    struct ledger_event *ev, struct readmodel_change *out)
{
	*out = (struct readmodel_change){ 0 };
	if (!ev->type || version != row->acc.version + 1)
		return false;
	if (ev->type == LEDGER_ACCOUNT_OPENED)
		ev->account_id = id;
	if (!ledger_evolve(&row->acc, ev))
		return false;
	switch (ev->type) {
	case LEDGER_ACCOUNT_OPENED:
		snprintf(row->name, sizeof(row->name), "%s", ev->name);
		out->opened = true;
		out->totals.accounts = 1;
		out->totals.open_accounts = 1;
		break;
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		out->totals.open_accounts = -1;
		break;
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_TRANSFER_RECEIVED:
		out->totals.balance_sum = ev->amount;
		break;
	case LEDGER_FUNDS_WITHDRAWN:
	case LEDGER_TRANSFER_SENT:
		out->totals.balance_sum = -(__int128)ev->amount;
		break;
	}
	out->entry_type = readmodel_entry_type(ev->type);
	if (out->entry_type)
		row->entries++;
	out->transfer = ev->type == LEDGER_TRANSFER_SENT;
	return true;
}

void readmodel_count_add(struct readmodel_count *to, const struct readmodel_count *d)
{
	to->accounts += d->accounts;
	to->open_accounts += d->open_accounts;
	to->balance_sum += d->balance_sum;
}

const char *readmodel_status(const struct ledger_account *acc)
{
	return acc->closed ? "closed" : "open";
}

struct readmodel_account readmodel_account_of(const struct readmodel_row *row,
					      const char *opened_at, const char *updated_at)
{
	return (struct readmodel_account){
		.account_id = row->acc.id,
		.name = row->name,
		.currency = row->acc.currency,
		.status = readmodel_status(&row->acc),
		.balance = row->acc.balance,
		.overdraft_limit = row->acc.overdraft_limit,
		.version = row->acc.version,
		.opened_at = opened_at,
		.updated_at = updated_at,
	};
}

struct readmodel_entry readmodel_entry_of(const struct readmodel_row *row,
					  const struct ledger_event *ev, const char *at)
{
	return (struct readmodel_entry){
		.version = row->acc.version,
		.type = readmodel_entry_type(ev->type),
		.amount = ev->amount,
		.balance_after = row->acc.balance,
		.transfer_id = ev->transfer_id,
		.counterparty = ev->counterparty,
		.reference = ev->reference,
		.at = at,
	};
}

struct readmodel_transfer readmodel_transfer_of(const struct readmodel_row *from,
						const struct ledger_event *ev, const char *at)
{
	return (struct readmodel_transfer){
		.transfer_id = ev->transfer_id,
		.from = from->acc.id,
		.to = ev->counterparty,
		.currency = from->acc.currency,
		.reference = ev->reference,
		.at = at,
		.amount = ev->amount,
	};
}

static int by_currency(const void *a, const void *b)
{
	return strcmp((*(const struct readmodel_totals *const *)a)->currency,
		      (*(const struct readmodel_totals *const *)b)->currency);
}

char *readmodel_totals_json_of(const struct readmodel_totals *const *totals, size_t n)
{
	const struct readmodel_totals **sorted = malloc((n ? n : 1) * sizeof(*sorted));
	struct readmodel_total *rows = malloc((n ? n : 1) * sizeof(*rows));
	char(*text)[3][48] = malloc((n ? n : 1) * sizeof(*text));
	char *body = NULL;

	if (!sorted || !rows || !text)
		goto done;
	for (size_t i = 0; i < n; i++)
		sorted[i] = totals[i];
	qsort(sorted, n, sizeof(*sorted), by_currency);
	for (size_t i = 0; i < n; i++) {
		const struct readmodel_count *c = &sorted[i]->count;
		readmodel_int128_text(c->accounts, text[i][0]);
		readmodel_int128_text(c->open_accounts, text[i][1]);
		readmodel_int128_text(c->balance_sum, text[i][2]);
		rows[i] = (struct readmodel_total){ .currency = sorted[i]->currency,
						    .accounts = text[i][0],
						    .open_accounts = text[i][1],
						    .balance_sum = text[i][2] };
	}
	body = readmodel_totals_json(rows, n);
done:
	free(sorted);
	free(rows);
	free(text);
	return body;
}
