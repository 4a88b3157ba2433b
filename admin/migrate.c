/* daybook-admin migrate: apply sql/NNN_name.sql files in order, each once, checksummed. */
#include <dirent.h>
#include <errno.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin.h"
#include "cli.h"
#include "clock.h"
#include "digest.h"
#include "readmodel.h"

#ifndef DAYBOOK_SQL_DIR
#define DAYBOOK_SQL_DIR "sql"
#endif

/* Any constant will do, as long as every migrate uses the same one. */
#define MIGRATE_LOCK_KEY "7406104711"

struct migration {
	int version;
	char name[256];
	char checksum[DIGEST_SHA256_HEX_LEN + 1];
	char *sql; /* owned */
};

static int by_version(const void *a, const void *b)
{
	const struct migration *x = a, *y = b;
	return (x->version > y->version) - (x->version < y->version);
}

static char *read_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long len;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
		buf = malloc((size_t)len + 1);
		if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
			free(buf);
			buf = NULL;
		} else if (buf) {
			buf[len] = '\0';
		}
	}
	fclose(f);
	return buf;
}

/* "NNN_name.sql" → version; -1 for any other file name. */
static int file_version(const char *name)
{
	char *end;
	long v;
	size_t n = strlen(name);

	if (n < 6 || strcmp(name + n - 4, ".sql") != 0 || name[0] < '0' || name[0] > '9')
		return -1;
	v = strtol(name, &end, 10);
	return *end == '_' && v >= 0 && v < 1000000 ? (int)v : -1;
}

static void free_migrations(struct migration *m, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(m[i].sql);
	free(m);
}

/* Read every migration in dir, sorted by version. */
static int load_dir(const struct log *log, const char *dir, struct migration **out, size_t *count)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	struct migration *m = NULL;
	size_t n = 0;

	if (!d) {
		log_error(log, "cannot open migrations directory %s: %s", dir, strerror(errno));
		return -1;
	}
	while ((e = readdir(d))) {
		int v = file_version(e->d_name);
		char path[4096];
		struct migration *grown;
		if (v < 0)
			continue;
		grown = realloc(m, (n + 1) * sizeof(*m));
		if (!grown)
			goto fail;
		m = grown;
		memset(&m[n], 0, sizeof(m[n]));
		m[n].version = v;
		snprintf(m[n].name, sizeof(m[n].name), "%s", e->d_name);
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		m[n].sql = read_file(path);
		if (!m[n].sql) {
			log_error(log, "cannot read %s: %s", path, strerror(errno));
			n++;
			goto fail;
		}
		unsigned char digest[DIGEST_SHA256_LEN];
		if (!digest_sha256(m[n].sql, strlen(m[n].sql), digest)) {
			log_error(log, "cannot checksum %s: out of memory", path);
			n++;
			goto fail;
		}
		digest_hex(digest, DIGEST_SHA256_LEN, m[n].checksum);
		n++;
	}
	closedir(d);
	qsort(m, n, sizeof(*m), by_version);
	for (size_t i = 1; i < n; i++) {
		if (m[i].version == m[i - 1].version) {
			log_error(log, "%s and %s share version %d", m[i - 1].name, m[i].name,
				  m[i].version);
			free_migrations(m, n);
			return -1;
		}
	}
	*out = m;
	*count = n;
	return 0;
fail:
	closedir(d);
	free_migrations(m, n);
	return -1;
}

static bool exec_ok(const struct log *log, PGconn *conn, const char *sql, const char *what)
{
	char pqline[1024];
	PGresult *r = PQexec(conn, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	if (!ok)
		log_error(log, "%s: %s", what,
			  log_oneline(PQresultErrorMessage(r), pqline, sizeof(pqline)));
	PQclear(r);
	return ok;
}

/* How long a migration may wait for each lock, and how long migrate keeps trying. */
struct lock_policy {
	long timeout_ms;
	long wait_s;
};

enum applied { APPLY_FAILED, APPLY_DONE, APPLY_LOCKED };

/* The migration's own SQL: APPLY_LOCKED when a lock was not granted within the
 * timeout (lock_not_available, 55P03; not logged: the caller tries again). */
static enum applied exec_migration(const struct log *log, PGconn *conn, const struct migration *m)
{
	char pqline[1024];
	PGresult *r = PQexec(conn, m->sql);
	ExecStatusType st = PQresultStatus(r);
	const char *code = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	enum applied a = APPLY_DONE;

	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
		a = code && strcmp(code, "55P03") == 0 ? APPLY_LOCKED : APPLY_FAILED;
		if (a == APPLY_FAILED)
			log_error(log, "%s: %s", m->name,
				  log_oneline(PQresultErrorMessage(r), pqline, sizeof(pqline)));
	}
	PQclear(r);
	return a;
}

/* Apply one migration and record it, in one transaction. Each lock it takes is waited
 * for at most lock_timeout: a migration that needs a table's exclusive lock (ALTER,
 * DROP TRIGGER) while a long transaction reads the table would otherwise queue every
 * append and read of that table behind itself for as long as that transaction runs. */
static enum applied apply(const struct log *log, PGconn *conn, const struct migration *m,
			  const struct lock_policy *lp)
{
	char pqline[1024];
	char version[16], set[64];
	const char *params[3] = { version, m->name, m->checksum };
	PGresult *r;
	enum applied a = APPLY_FAILED;
	bool ok;

	snprintf(version, sizeof(version), "%d", m->version);
	snprintf(set, sizeof(set), "SET LOCAL lock_timeout = %ld", lp->timeout_ms);
	if (!exec_ok(log, conn, "BEGIN", "BEGIN"))
		return APPLY_FAILED;
	if (!exec_ok(log, conn, set, "settings") ||
	    (a = exec_migration(log, conn, m)) != APPLY_DONE) {
		exec_ok(log, conn, "ROLLBACK", "ROLLBACK");
		return a;
	}
	r = PQexecParams(conn,
			 "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
			 3, NULL, params, NULL, NULL, 0);
	ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	if (!ok)
		log_error(log, "recording %s: %s", m->name,
			  log_oneline(PQresultErrorMessage(r), pqline, sizeof(pqline)));
	PQclear(r);
	if (!ok) {
		exec_ok(log, conn, "ROLLBACK", "ROLLBACK");
		return APPLY_FAILED;
	}
	return exec_ok(log, conn, "COMMIT", "COMMIT") ? APPLY_DONE : APPLY_FAILED;
}

/* apply, again after a pause while a lock is not granted (the pause doubles from 1 s to
 * 10 s), for at most lp->wait_s seconds. Between two tries the tables are free. */
static bool apply_waiting(const struct log *log, PGconn *conn, const struct migration *m,
			  const struct lock_policy *lp)
{
	double end = mono_now() + (double)lp->wait_s, pause = 1;

	for (;;) {
		enum applied a = apply(log, conn, m, lp);
		double left = end - mono_now();
		struct timespec ts;

		if (a != APPLY_LOCKED)
			return a == APPLY_DONE;
		if (left <= 0) {
			log_error(log,
				  "%s: a lock it needs was held by another transaction (a long read "
				  "or write of the table) through every try for %ld s; nothing of it "
				  "is applied: run migrate again when that transaction has ended, or "
				  "give it longer (--lock-wait)",
				  m->name, lp->wait_s);
			return false;
		}
		if (pause > left)
			pause = left;
		log_warn(log,
			 "%s: waited %ld ms for a lock another transaction holds; trying again "
			 "in %.0f s (giving up after %ld s in all)",
			 m->name, lp->timeout_ms, pause, lp->wait_s);
		ts.tv_sec = (time_t)pause;
		ts.tv_nsec = (long)((pause - (double)ts.tv_sec) * 1e9);
		nanosleep(&ts, NULL);
		pause = pause * 2 > 10 ? 10 : pause * 2;
	}
}

/* The checksum recorded for a version, or NULL when it was never applied. */
static const char *applied_checksum(PGresult *applied, int version)
{
	for (int i = 0; i < PQntuples(applied); i++)
		if (atoi(PQgetvalue(applied, i, 0)) == version)
			return PQgetvalue(applied, i, 1);
	return NULL;
}

/* The applied migrations (version, checksum); an empty result before the first. */
static PGresult *applied_migrations(PGconn *conn)
{
	PGresult *r = PQexec(conn, "SELECT to_regclass('schema_migrations') IS NOT NULL");
	bool exists = PQresultStatus(r) == PGRES_TUPLES_OK && strcmp(PQgetvalue(r, 0, 0), "t") == 0;

	PQclear(r);
	return PQexec(conn, exists ? "SELECT version, checksum FROM schema_migrations"
				   : "SELECT NULL::int, NULL::text WHERE false");
}

/* Refuse before applying anything if an applied migration's file has changed. */
static bool unchanged(const struct log *log, PGresult *applied, const struct migration *m, size_t n)
{
	bool ok = true;

	for (size_t i = 0; i < n; i++) {
		const char *sum = applied_checksum(applied, m[i].version);
		if (sum && strcmp(sum, m[i].checksum) != 0) {
			log_error(log,
				  "migration %s was applied with checksum %s but the file "
				  "now has %s; an applied migration must not change (add a new one)",
				  m[i].name, sum, m[i].checksum);
			ok = false;
		}
	}
	return ok;
}

static int run(const struct log *log, PGconn *conn, struct migration *m, size_t n,
	       const struct lock_policy *lp)
{
	char pqline[1024];
	PGresult *applied = applied_migrations(conn);
	int done = 0, rc = 0;

	if (PQresultStatus(applied) != PGRES_TUPLES_OK) {
		log_error(log, "reading schema_migrations: %s",
			  log_oneline(PQresultErrorMessage(applied), pqline, sizeof(pqline)));
		PQclear(applied);
		return 1;
	}
	if (!unchanged(log, applied, m, n)) {
		PQclear(applied);
		return 1;
	}
	for (size_t i = 0; i < n && rc == 0; i++) {
		if (applied_checksum(applied, m[i].version))
			continue;
		if (!apply_waiting(log, conn, &m[i], lp)) {
			rc = 1;
			break;
		}
		printf("applied %s\n", m[i].name);
		done++;
	}
	if (rc == 0 && done == 0)
		printf("schema is up to date (%zu migrations)\n", n);
	PQclear(applied);
	return rc;
}

/* Give the store a new deployment id, hence a new identity: after a physical restore
 * (a base backup or a point-in-time recovery keeps the cluster's system identifier,
 * the database's OID and the deployment id), so that no Redis generation built before
 * is adopted or served (docs/operations.md). */
static int new_identity(const struct log *log, PGconn *conn)
{
	PGresult *r = PQexec(conn, "UPDATE deployment_identity SET deployment_id = "
				   "gen_random_uuid(), created_at = now()");
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK && strcmp(PQcmdTuples(r), "1") == 0;

	if (ok) {
		PQclear(r);
		r = PQexec(conn, READMODEL_IDENTITY_SQL);
		ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
	}

	if (ok)
		printf("the event store's identity is now %s\n", PQgetvalue(r, 0, 0));
	else
		log_error(log, "giving the event store a new identity: %s",
			  PQresultStatus(r) == PGRES_COMMAND_OK ? "no deployment_identity row"
								: PQresultErrorMessage(r));
	PQclear(r);
	return ok ? 0 : 1;
}

int admin_migrate(struct admin_ctx *ctx, int argc, char **argv)
{
	const char *dir = getenv("DAYBOOK_MIGRATIONS");
	struct migration *m = NULL;
	size_t n = 0;
	PGconn *conn;
	bool renew = false;
	struct lock_policy lp = { .timeout_ms = 2000, .wait_s = 60 };
	char line[1024], *end;
	const struct log *log;
	int rc;

	static const struct option options[] = {
		{ "dir", required_argument, NULL, 'd' },
		{ "new-identity", no_argument, NULL, 'N' },
		{ "lock-timeout", required_argument, NULL, 'T' },
		{ "lock-wait", required_argument, NULL, 'W' },
		CLI_COMMON_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	int c;

	if (!dir || !*dir)
		dir = DAYBOOK_SQL_DIR;
	while ((c = getopt_long(argc, argv, "+:d:h", options, NULL)) != -1) {
		switch (c) {
		case 'd':
			dir = optarg;
			break;
		case 'N':
			renew = true;
			break;
		case 'T':
			errno = 0;
			lp.timeout_ms = strtol(optarg, &end, 10);
			if (errno || end == optarg || *end || lp.timeout_ms < 1 ||
			    lp.timeout_ms > 600000)
				return admin_usage_error("migrate",
							 "--lock-timeout must be milliseconds, 1 to "
							 "600000; got '%s'",
							 optarg);
			break;
		case 'W':
			errno = 0;
			lp.wait_s = strtol(optarg, &end, 10);
			if (errno || end == optarg || *end || lp.wait_s < 0 || lp.wait_s > 86400)
				return admin_usage_error("migrate",
							 "--lock-wait must be seconds, 0 to 86400; "
							 "got '%s'",
							 optarg);
			break;
		case 'h':
			return admin_help("migrate");
		default:
			return admin_getopt_error("migrate", argc, argv, c);
		}
	}
	if (optind < argc)
		return admin_usage_error("migrate", "unexpected argument '%s'", argv[optind]);
	if (!admin_configure(ctx, "migrate"))
		return CLI_EXIT_USAGE;
	log = &ctx->log;
	if (load_dir(log, dir, &m, &n))
		return CLI_EXIT_PROBLEM;
	conn = PQconnectdb(ctx->cfg.pg);
	if (PQstatus(conn) != CONNECTION_OK) {
		log_error(log, "cannot connect to PostgreSQL: %s",
			  log_oneline(PQerrorMessage(conn), line, sizeof(line)));
		PQfinish(conn);
		free_migrations(m, n);
		return CLI_EXIT_UNAVAILABLE;
	}
	/* Concurrent migrates queue up instead of racing; the lock ends with the session. */
	if (exec_ok(log, conn, "SET client_min_messages = warning", "settings") &&
	    exec_ok(log, conn, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", "locking"))
		rc = run(log, conn, m, n, &lp);
	else
		rc = 1;
	if (rc == 0 && renew)
		rc = new_identity(log, conn);
	PQfinish(conn);
	free_migrations(m, n);
	return rc;
}
