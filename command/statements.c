/* The statements the batcher prepares on each connection: names here, texts in the
 * room that runs them (load.c, append.c, idem.c). */
#include "batch.h"

static const struct pg_statement statements[] = {
	{ "load_streams", sql_load_streams },
	{ "load_streams_full", sql_load_streams_full },
	{ "load_idem", sql_load_idem },
	{ "load_transfers", sql_load_transfers },
	{ "append", sql_append },
	{ "append_idem", sql_append_idem },
	{ "idem_put", sql_idem_put },
	{ "snapshot_put", sql_snapshot_put },
	{ "fence", sql_fence },
};

const struct pg_statement *command_statements(size_t *n)
{
	*n = sizeof(statements) / sizeof(statements[0]);
	return statements;
}
