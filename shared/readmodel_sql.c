/* The bodies' fields from SQL rows of the read-model tables, in the column order of
 * READMODEL_SQL_ACCOUNT_COLUMNS, READMODEL_SQL_ENTRY_COLUMNS and
 * READMODEL_SQL_TRANSFER_COLUMNS. */
#include "readmodel.h"

#include <libpq-fe.h>
#include <stdlib.h>

static const char *text_of(const PGresult *res, int row, int col)
{
	return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t int_of(const PGresult *res, int row, int col)
{
	return strtoll(PQgetvalue(res, row, col), NULL, 10);
}

struct readmodel_account readmodel_account_from_pg(const PGresult *res, int row, int col)
{
	return (struct readmodel_account){
		.account_id = text_of(res, row, col),
		.name = text_of(res, row, col + 1),
		.currency = text_of(res, row, col + 2),
		.balance = int_of(res, row, col + 3),
		.overdraft_limit = int_of(res, row, col + 4),
		.status = text_of(res, row, col + 5),
		.version = (int32_t)int_of(res, row, col + 6),
		.opened_at = text_of(res, row, col + 7),
		.updated_at = text_of(res, row, col + 8),
	};
}

struct readmodel_entry readmodel_entry_from_pg(const PGresult *res, int row, int col)
{
	return (struct readmodel_entry){
		.version = (int32_t)int_of(res, row, col),
		.type = text_of(res, row, col + 1),
		.amount = int_of(res, row, col + 2),
		.balance_after = int_of(res, row, col + 3),
		.transfer_id = text_of(res, row, col + 4),
		.counterparty = text_of(res, row, col + 5),
		.reference = text_of(res, row, col + 6),
		.at = text_of(res, row, col + 7),
	};
}

struct readmodel_transfer readmodel_transfer_from_pg(const PGresult *res, int row, int col)
{
	return (struct readmodel_transfer){
		.transfer_id = text_of(res, row, col),
		.from = text_of(res, row, col + 1),
		.to = text_of(res, row, col + 2),
		.amount = int_of(res, row, col + 3),
		.currency = text_of(res, row, col + 4),
		.reference = text_of(res, row, col + 5),
		.at = text_of(res, row, col + 6),
	};
}
