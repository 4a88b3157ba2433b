/* The projector's SQL statements, prepared on its session (projector_statements). The
 * session plans them generically (main.c: a custom plan for every batch cost 8 % of the
 * backend's CPU), so nothing a good plan depends on may be a parameter: a generic plan
 * takes a LIMIT $n for a tenth of the table, and for a page of rm_accounts that made it
 * sort the whole table on every page once the table was large (a Redis resync at
 * 1,000,000 accounts: 150 ms a page instead of 9). Page sizes are literals here
 * (test projector/the_statements_plan_page_reads_by_index). */
#include "projector.h"

#define READ_EVENTS_LIMIT READMODEL_TEXT(PROJECTOR_BATCH_MAX)
#define SYNC_ACCOUNTS_LIMIT READMODEL_TEXT(PROJECTOR_SYNC_ACCOUNTS_PAGE)
#define SYNC_TRANSFERS_LIMIT READMODEL_TEXT(PROJECTOR_SYNC_TRANSFERS_PAGE)
#define SYNC_ACCOUNT_COLUMNS                                                                       \
	READMODEL_SQL_ACCOUNT_COLUMNS("p") ", p.entries, " READMODEL_SQL_ENTRY_COLUMNS("e")
#define SYNC_TRANSFER_COLUMNS READMODEL_SQL_TRANSFER_COLUMNS("rm_transfers")

static const struct pg_statement statements[] = {
	/* Is (txid, position) an event of this log? (a Redis generation ahead of SQL names
	 * one as its checkpoint: redis_sync.c) */
	{ "event_at", "SELECT 1 FROM events WHERE txid = $1::xid8 AND position = $2::bigint" },
	{ "load_checkpoint", "SELECT txid::text, position, generation FROM projection_checkpoints "
			     "WHERE projection = '" PROJECTOR_PROJECTION "'" },
	/* The batch's events in binary (no text output of positions, ids or times on the
	 * server), each row with the log's head then (an init plan, evaluated once: the
	 * lag metrics' estimate, which needs no statement of its own). */
	{ "read_events",
	  "SELECT position, txid, substr(stream, 9), version, type, data, recorded_at, "
	  "(SELECT coalesce(max(position), 0) FROM events) "
	  "FROM events WHERE (txid, position) > ($1::xid8, $2::bigint) "
	  "AND txid < pg_snapshot_xmin(pg_current_snapshot()) "
	  "ORDER BY events.txid, events.position LIMIT " READ_EVENTS_LIMIT },
	{ "load_accounts",
	  "SELECT " READMODEL_SQL_ACCOUNT_COLUMNS(
		  "rm_accounts") ", rm_accounts.entries "
				 "FROM rm_accounts WHERE account_id = ANY($1::text[])" },
	{ "load_totals",
	  "SELECT currency, accounts, open_accounts, balance_sum::text FROM rm_totals" },
	{ "sync_accounts",
	  "WITH page AS (SELECT * FROM rm_accounts WHERE account_id > $1 ORDER BY account_id "
	  "LIMIT " SYNC_ACCOUNTS_LIMIT ") SELECT " SYNC_ACCOUNT_COLUMNS " FROM page p "
	  "LEFT JOIN LATERAL (SELECT * FROM rm_entries x WHERE x.account_id = p.account_id "
	  "ORDER BY x.version DESC LIMIT " READMODEL_ITEMS_KEPT_TEXT ") e ON true "
	  "ORDER BY p.account_id, e.version" },
	{ "sync_transfers",
	  "SELECT " SYNC_TRANSFER_COLUMNS " FROM rm_transfers WHERE transfer_id > $1 "
	  "ORDER BY transfer_id LIMIT " SYNC_TRANSFERS_LIMIT },
	/* The batch's first statement: the switch guard (a rebuild's switch takes this lock
	 * exclusively: writes wait while it swaps), taken before any read-model table is
	 * locked, then the checkpoint's compare-and-set ($1 epoch, $2 $3 from, $4
	 * generation, $5 $6 to), which fails with SQLSTATE PROJECTOR_SQLSTATE_FENCED or
	 * PROJECTOR_SQLSTATE_CHECKPOINT_MOVED (sql/010). The compare-and-set is
	 * projector_checkpoint_move's, in plain SQL and in its order (the guard, the lease
	 * row FOR SHARE, then the checkpoint's row), so that a batch pays no PL/pgSQL call,
	 * search_path switch or SPI statements; only when it moved nothing is the function
	 * called, to raise the condition that holds (it moves the checkpoint itself only if
	 * the conditions hold by then). */
	{ "move_checkpoint",
	  "WITH guard AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(" READMODEL_SWITCH_LOCK
	  ")), "
	  "lease AS MATERIALIZED (SELECT l.epoch FROM guard, projector_leases l "
	  "WHERE l.projection = '" PROJECTOR_PROJECTION "' FOR SHARE OF l), "
	  "moved AS (UPDATE projection_checkpoints c SET txid = $5::xid8, position = $6::bigint, "
	  "epoch = $1::bigint, updated_at = now() FROM lease WHERE c.projection = '" PROJECTOR_PROJECTION
	  "' AND lease.epoch = $1::bigint AND $1::bigint > 0 AND c.txid = $2::xid8 "
	  "AND c.position = $3::bigint AND c.generation = $4::bigint RETURNING 1) "
	  "SELECT CASE WHEN EXISTS (SELECT FROM moved) THEN NULL ELSE "
	  "projector_checkpoint_move('" PROJECTOR_PROJECTION "', $1::bigint, $2::xid8, "
	  "$3::bigint, $4::bigint, $5::xid8, $6::bigint) END FROM guard" },
	/* The batch's rows, one statement over arrays (one executor start instead of one per
	 * table): accounts ($1-$10), statement items ($11-$19), the totals' deltas
	 * ($20-$23); transfers have no rows, the SQL model reads them from the log (sql/017).
	 * The arrays come in binary (fold.c). Each array is unnested in the select list (a
	 * ProjectSet, in step with the others: the arrays of a table are of one length), not
	 * in FROM: unnest(a, b, ...) in FROM is a table function whose rows are copied into
	 * a tuplestore before the insert reads them (docs/performance.md, "Less PostgreSQL
	 * work per transfer"). No NOTIFY here: a
	 * transaction that notifies takes the database's notify lock at commit and holds it
	 * through its commit, so the batch would wait for every command append committing
	 * (and its WAL flush) and they for it; the new checkpoint is announced once
	 * committed, on a connection of its own (step.c, notify_position). */
	{ "write_rows",
	  "WITH a AS (INSERT INTO rm_accounts (account_id, name, currency, balance, "
	  "overdraft_limit, status, version, entries, opened_at, updated_at) SELECT "
	  "unnest($1::text[]), unnest($2::text[]), unnest($3::text[]), unnest($4::bigint[]), "
	  "unnest($5::bigint[]), unnest($6::text[]), unnest($7::int[]), unnest($8::int[]), "
	  "unnest($9::timestamptz[]), unnest($10::timestamptz[]) ON CONFLICT (account_id) "
	  "DO UPDATE SET name = EXCLUDED.name, currency = EXCLUDED.currency, balance = "
	  "EXCLUDED.balance, overdraft_limit = EXCLUDED.overdraft_limit, status = EXCLUDED.status, "
	  "version = EXCLUDED.version, entries = EXCLUDED.entries, opened_at = EXCLUDED.opened_at, "
	  "updated_at = EXCLUDED.updated_at), "
	  "e AS (INSERT INTO rm_entries (account_id, version, type, amount, balance_after, "
	  "transfer_id, counterparty, reference, at) SELECT unnest($11::text[]), unnest($12::int[]), "
	  "unnest($13::text[]), unnest($14::bigint[]), unnest($15::bigint[]), unnest($16::text[]), "
	  "unnest($17::text[]), unnest($18::text[]), unnest($19::timestamptz[])), "
	  "c AS (INSERT INTO rm_totals (currency, accounts, open_accounts, balance_sum) SELECT "
	  "unnest($20::text[]), unnest($21::bigint[]), unnest($22::bigint[]), "
	  "unnest($23::text[]::numeric[]) "
	  "ON CONFLICT "
	  "(currency) DO UPDATE SET accounts = rm_totals.accounts + EXCLUDED.accounts, "
	  "open_accounts = rm_totals.open_accounts + EXCLUDED.open_accounts, balance_sum = "
	  "rm_totals.balance_sum + EXCLUDED.balance_sum) "
	  "SELECT 1" },
};

const struct pg_statement *projector_statements(size_t *n)
{
	*n = sizeof(statements) / sizeof(statements[0]);
	return statements;
}
