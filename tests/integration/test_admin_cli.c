/* The binaries as an operator meets them: configuration errors at start (exit 2, one
 * line naming the variable), --help, and `daybook-admin migrate` on real databases. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "digest.h"
#include "harness.h"
#include "tokens.h"

TestSuite(admin_cli, .timeout = 120);

/* --- running a binary in a controlled environment ------------------------------------ */

struct proc {
	pid_t pid;
	FILE *out, *err;
	int status;     /* exit status; -1 when it did not exit by itself with one */
	bool timed_out; /* still running at the deadline: it was sent SIGTERM */
	char *stdout_text, *stderr_text;
};

static const char *env_required(const char *name)
{
	const char *v = getenv(name);

	cr_assert(v && *v, "%s is not set: run through meson test or set it by hand", name);
	return v;
}

/* Start argv with only PATH (and the few variables a sanitizer or libpq's password
 * lookup may need) plus `vars`, a NULL-terminated list of "NAME=value". */
static void proc_start(struct proc *p, const char *const *argv, const char *const *vars)
{
	static const char *const passed[] = { "PATH",        "HOME",         "PGPASSWORD",
					      "PGPASSFILE",  "ASAN_OPTIONS", "UBSAN_OPTIONS",
					      "LSAN_OPTIONS" };
	char *envp[64], inherited[sizeof(passed) / sizeof(passed[0])][4096];
	size_t n = 0;

	memset(p, 0, sizeof(*p));
	for (size_t i = 0; i < sizeof(passed) / sizeof(passed[0]); i++) {
		const char *v = getenv(passed[i]);
		if (!v)
			continue;
		snprintf(inherited[i], sizeof(inherited[i]), "%s=%s", passed[i], v);
		envp[n++] = inherited[i];
	}
	for (size_t i = 0; vars && vars[i]; i++) {
		cr_assert_lt(n, sizeof(envp) / sizeof(envp[0]) - 1);
		envp[n++] = (char *)vars[i];
	}
	envp[n] = NULL;
	p->out = tmpfile();
	p->err = tmpfile();
	cr_assert(p->out && p->err);
	fflush(NULL);
	p->pid = fork();
	cr_assert(p->pid >= 0, "fork: %s", strerror(errno));
	if (p->pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(fileno(p->out), 1);
		dup2(fileno(p->err), 2);
		execve(argv[0], (char *const *)argv, envp);
		fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
}

static char *slurp_fd(FILE *f)
{
	off_t n = lseek(fileno(f), 0, SEEK_END);
	char *text;

	cr_assert(n >= 0);
	text = calloc(1, (size_t)n + 1);
	cr_assert_not_null(text);
	cr_assert_eq(pread(fileno(f), text, (size_t)n, 0), (ssize_t)n);
	fclose(f);
	return text;
}

/* Wait up to timeout_s for the process to exit; past it, SIGTERM (then SIGKILL). */
static void proc_wait(struct proc *p, double timeout_s)
{
	double end = harness_now() + timeout_s;
	int ws = 0;
	pid_t r;

	while ((r = waitpid(p->pid, &ws, WNOHANG)) == 0 && harness_now() < end)
		usleep(5000);
	if (r == 0) {
		p->timed_out = true;
		kill(p->pid, SIGTERM);
		for (end = harness_now() + 10;
		     (r = waitpid(p->pid, &ws, WNOHANG)) == 0 && harness_now() < end;)
			usleep(5000);
		if (r == 0) {
			kill(p->pid, SIGKILL);
			waitpid(p->pid, &ws, 0);
		}
	}
	p->status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
	p->stdout_text = slurp_fd(p->out);
	p->stderr_text = slurp_fd(p->err);
}

static struct proc run(const char *const *argv, const char *const *vars, double timeout_s)
{
	struct proc p;

	proc_start(&p, argv, vars);
	proc_wait(&p, timeout_s);
	return p;
}

static void proc_free(struct proc *p)
{
	free(p->stdout_text);
	free(p->stderr_text);
}

static size_t count_lines(const char *text)
{
	size_t n = 0;

	for (; *text; text++)
		n += *text == '\n';
	return n;
}

/* Exit status 2, nothing on stdout, one line on stderr that names `var`. */
static void assert_refused_naming(const struct proc *p, const char *var)
{
	cr_assert_not(p->timed_out, "it started instead of refusing %s; stderr: %s", var,
		      p->stderr_text);
	cr_assert_eq(p->status, 2, "exit status %d; stderr: %s", p->status, p->stderr_text);
	cr_assert_str_eq(p->stdout_text, "");
	cr_assert_not_null(strstr(p->stderr_text, var), "stderr should name %s: %s", var,
			   p->stderr_text);
	cr_assert_eq(count_lines(p->stderr_text), 1, "one line on stderr: %s", p->stderr_text);
}

/* --- daybook-command's configuration --------------------------------------------------- */

static void write_file(const char *path, const char *text, const char *mode)
{
	FILE *f = fopen(path, mode);

	cr_assert_not_null(f, "%s: %s", path, strerror(errno));
	fputs(text, f);
	cr_assert_eq(fclose(f), 0);
}

/* A tokens file with one valid line (and whatever `extra` adds); path gets its name. */
static void tokens_file(char *path, size_t len, const char *extra)
{
	unsigned char d[DIGEST_SHA256_LEN];
	char hex[65], text[512];

	cr_assert(digest_sha256("cli-secret", 10, d));
	digest_hex(d, DIGEST_SHA256_LEN, hex);
	snprintf(path, len, "/tmp/daybook-test-cli-tokens-%d-%ld.txt", (int)getpid(),
		 (long)(harness_now() * 1e6) % 1000000);
	snprintf(text, sizeof(text), "# cli test\nops %s write,read\n%s", hex, extra);
	write_file(path, text, "w");
}

/* The settings of one daybook-command run: "NAME=value", or "" to leave it unset.
 * By default all are valid, with a PostgreSQL that is never reached. */
struct command_env {
	char pg[256], tokens[300], listen[64], level[64];
	char tokens_path[256];
};

static void command_env_valid(struct command_env *e)
{
	tokens_file(e->tokens_path, sizeof(e->tokens_path), "");
	snprintf(e->pg, sizeof(e->pg),
		 "DAYBOOK_PG=host=127.0.0.1 port=1 dbname=none connect_timeout=1");
	snprintf(e->tokens, sizeof(e->tokens), "DAYBOOK_TOKENS_FILE=%s", e->tokens_path);
	snprintf(e->listen, sizeof(e->listen), "DAYBOOK_LISTEN=127.0.0.1:%d", harness_free_port());
	snprintf(e->level, sizeof(e->level), "DAYBOOK_LOG_LEVEL=info");
}

/* Run daybook-command (with `arg`, or none) for at most timeout_s seconds. */
static struct proc run_command(const struct command_env *e, const char *arg, double timeout_s)
{
	const char *argv[] = { env_required("DAYBOOK_COMMAND_BIN"), arg, NULL };
	const char *vars[5];
	const char *const all[] = { e->pg, e->tokens, e->listen, e->level };
	size_t n = 0;

	for (size_t i = 0; i < 4; i++)
		if (all[i][0])
			vars[n++] = all[i];
	vars[n] = NULL;
	return run(argv, vars, timeout_s);
}

/* daybook-command with the settings of e refuses to start, naming var (see
 * assert_refused_naming). */
static void assert_command_refuses(const struct command_env *e, const char *var)
{
	struct proc p = run_command(e, NULL, 10);

	assert_refused_naming(&p, var);
	proc_free(&p);
}

Test(admin_cli, command_starts_with_valid_settings)
{
	/* The control for the refusals below: only the one setting they spoil differs. */
	struct command_env e;
	struct proc p;

	command_env_valid(&e);
	p = run_command(&e, NULL, 1.5);
	cr_assert(p.timed_out, "exited %d at start: %s", p.status, p.stderr_text);
	cr_assert_eq(p.status, 0, "SIGTERM is a clean exit: %s", p.stderr_text);
	proc_free(&p);
	unlink(e.tokens_path);
}

Test(admin_cli, command_without_pg_exits_2)
{
	struct command_env e;

	command_env_valid(&e);
	e.pg[0] = '\0';
	assert_command_refuses(&e, "DAYBOOK_PG");
	unlink(e.tokens_path);
}

Test(admin_cli, command_without_tokens_file_exits_2)
{
	struct command_env e;

	command_env_valid(&e);
	e.tokens[0] = '\0';
	assert_command_refuses(&e, "DAYBOOK_TOKENS_FILE");
	unlink(e.tokens_path);
}

Test(admin_cli, command_with_malformed_listen_exits_2)
{
	const char *bad[] = { "nonsense",        "127.0.0.1", "127.0.0.1:0",
			      "127.0.0.1:65536", ":8081",     "127.0.0.1:http" };
	struct command_env e;

	command_env_valid(&e);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(e.listen, sizeof(e.listen), "DAYBOOK_LISTEN=%s", bad[i]);
		assert_command_refuses(&e, "DAYBOOK_LISTEN");
	}
	unlink(e.tokens_path);
}

Test(admin_cli, command_with_unknown_log_level_exits_2)
{
	struct command_env e;

	command_env_valid(&e);
	snprintf(e.level, sizeof(e.level), "DAYBOOK_LOG_LEVEL=loud");
	assert_command_refuses(&e, "DAYBOOK_LOG_LEVEL");
	unlink(e.tokens_path);
}

Test(admin_cli, command_with_a_bad_idempotency_retention_or_sweep_interval_exits_2)
{
	/* Keys are kept at least 24 hours (SPEC §3): a shorter retention is refused. */
	const char *bad[][2] = {
		{ "DAYBOOK_IDEMPOTENCY_RETENTION_S", "3600" },
		{ "DAYBOOK_IDEMPOTENCY_RETENTION_S", "86399" },
		{ "DAYBOOK_IDEMPOTENCY_RETENTION_S", "25h" },
		{ "DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S", "0" },
		{ "DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S", "-5" },
	};
	struct command_env e;

	command_env_valid(&e);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		/* In the log level's place: that one then takes its default. */
		snprintf(e.level, sizeof(e.level), "%s=%s", bad[i][0], bad[i][1]);
		assert_command_refuses(&e, bad[i][0]);
	}
	snprintf(e.level, sizeof(e.level), "DAYBOOK_IDEMPOTENCY_RETENTION_S=86400");
	{
		struct proc p = run_command(&e, NULL, 1.5);
		cr_assert(p.timed_out, "24 hours is allowed; exited %d: %s", p.status,
			  p.stderr_text);
		proc_free(&p);
	}
	unlink(e.tokens_path);
}

Test(admin_cli, command_with_a_bad_tokens_line_exits_2)
{
	struct command_env e;
	char where[300];
	struct proc p;

	command_env_valid(&e);
	unlink(e.tokens_path);
	tokens_file(e.tokens_path, sizeof(e.tokens_path), "intruder not-a-hash write\n");
	snprintf(e.tokens, sizeof(e.tokens), "DAYBOOK_TOKENS_FILE=%s", e.tokens_path);
	p = run_command(&e, NULL, 10);
	assert_refused_naming(&p, "DAYBOOK_TOKENS_FILE");
	snprintf(where, sizeof(where), "%s:3:", e.tokens_path);
	cr_assert_not_null(strstr(p.stderr_text, where), "stderr should say where: %s",
			   p.stderr_text);
	cr_assert_null(strstr(p.stderr_text, "cli-secret"));
	proc_free(&p);
	unlink(e.tokens_path);
}

Test(admin_cli, command_with_a_missing_tokens_file_exits_2)
{
	struct command_env e;
	struct proc p;

	command_env_valid(&e);
	unlink(e.tokens_path);
	p = run_command(&e, NULL, 10);
	assert_refused_naming(&p, "DAYBOOK_TOKENS_FILE");
	cr_assert_not_null(strstr(p.stderr_text, e.tokens_path), "%s", p.stderr_text);
	proc_free(&p);
}

Test(admin_cli, command_help_prints_usage_on_stdout)
{
	const char *argv[] = { env_required("DAYBOOK_COMMAND_BIN"), "--help", NULL };
	/* No settings at all: --help needs none. */
	struct proc p = run(argv, NULL, 10);

	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_not_null(strstr(p.stdout_text, "usage: daybook-command"), "%s", p.stdout_text);
	cr_assert_not_null(strstr(p.stdout_text, "DAYBOOK_PG"), "%s", p.stdout_text);
	cr_assert_not_null(strstr(p.stdout_text, "DAYBOOK_TOKENS_FILE"), "%s", p.stdout_text);
	cr_assert_str_eq(p.stderr_text, "");
	proc_free(&p);
}

Test(admin_cli, command_with_an_unknown_argument_exits_2)
{
	struct command_env e;
	struct proc p;

	command_env_valid(&e);
	p = run_command(&e, "--frobnicate", 10);
	cr_assert_not(p.timed_out, "it started and ignored the argument");
	cr_assert_eq(p.status, 2);
	cr_assert_not_null(strstr(p.stderr_text, "usage: daybook-command"), "%s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, "");
	proc_free(&p);
	unlink(e.tokens_path);
}

/* --- daybook-admin ------------------------------------------------------------------- */

Test(admin_cli, admin_help_and_usage_errors)
{
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");
	const char *help[] = { bin, "--help", NULL }, *none[] = { bin, NULL },
		   *unknown[] = { bin, "frobnicate", NULL };
	struct proc p;

	p = run(help, NULL, 10);
	cr_assert_eq(p.status, 0);
	cr_assert_not_null(strstr(p.stdout_text, "migrate"), "%s", p.stdout_text);
	cr_assert_not_null(strstr(p.stdout_text, "DAYBOOK_PG"), "%s", p.stdout_text);
	proc_free(&p);

	p = run(none, NULL, 10);
	cr_assert_eq(p.status, 2);
	cr_assert_not_null(strstr(p.stderr_text, "usage"), "%s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, "");
	proc_free(&p);

	p = run(unknown, NULL, 10);
	cr_assert_eq(p.status, 2);
	cr_assert_not_null(strstr(p.stderr_text, "frobnicate"), "%s", p.stderr_text);
	proc_free(&p);
}

Test(admin_cli, rebuild_with_a_bad_held_max_exits_2)
{
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");
	const char *argv[] = { bin, "rebuild", "all", NULL };
	const char *bad[] = { "0", "-5", "12x", "100000001" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char held[64];
		const char *env[] = { "DAYBOOK_PG=postgresql://127.0.0.1:1/none", held, NULL };
		struct proc p;

		snprintf(held, sizeof(held), "DAYBOOK_REBUILD_HELD_MAX=%s", bad[i]);
		p = run(argv, env, 10);
		assert_refused_naming(&p, "DAYBOOK_REBUILD_HELD_MAX");
		proc_free(&p);
	}
}

Test(admin_cli, migrate_without_pg_exits_2)
{
	const char *argv[] = { env_required("DAYBOOK_ADMIN_BIN"), "migrate", NULL };
	struct proc p = run(argv, NULL, 10);

	assert_refused_naming(&p, "DAYBOOK_PG");
	proc_free(&p);
}

/* An empty database (no migrations), named into db (64 bytes). */
static void create_empty_db(char *db, size_t len)
{
	static int counter;
	char cmd[128];
	PGconn *conn = PQconnectdb(env_required("DAYBOOK_TEST_PG"));
	PGresult *r;

	cr_assert(PQstatus(conn) == CONNECTION_OK, "DAYBOOK_TEST_PG: %s", PQerrorMessage(conn));
	snprintf(db, len, "cli_%d_%d_%ld", (int)getpid(), counter++,
		 (long)(harness_now() * 1000) % 100000);
	snprintf(cmd, sizeof(cmd), "CREATE DATABASE %s", db);
	r = PQexec(conn, cmd);
	cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK, "%s: %s", cmd, PQresultErrorMessage(r));
	PQclear(r);
	PQfinish(conn);
}

/* Best effort: a failed test leaves its database behind for a look. */
static void drop_db(const char *db)
{
	char cmd[128];
	PGconn *conn = PQconnectdb(env_required("DAYBOOK_TEST_PG"));

	snprintf(cmd, sizeof(cmd), "DROP DATABASE IF EXISTS %s WITH (FORCE)", db);
	PQclear(PQexec(conn, cmd));
	PQfinish(conn);
}

static int by_name(const void *a, const void *b)
{
	return strcmp(a, b);
}

/* The migration file names of dir, sorted; returns how many (at most max). */
static size_t list_sql(const char *dir, char names[][256], size_t max)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	size_t n = 0;

	cr_assert_not_null(d, "%s: %s", dir, strerror(errno));
	while ((e = readdir(d))) {
		size_t len = strlen(e->d_name);
		if (len > 4 && strcmp(e->d_name + len - 4, ".sql") == 0 && n < max)
			snprintf(names[n++], 256, "%s", e->d_name);
	}
	closedir(d);
	qsort(names, n, 256, by_name);
	return n;
}

static char *read_file(const char *path)
{
	FILE *f = fopen(path, "rb");

	cr_assert_not_null(f, "%s: %s", path, strerror(errno));
	return slurp_fd(f);
}

/* A private copy of the project's migrations, into dir (64 bytes). */
static size_t copy_sql_dir(char *dir, size_t len, char names[][256], size_t max)
{
	const char *src = env_required("DAYBOOK_SQL_DIR");
	size_t n = list_sql(src, names, max);

	snprintf(dir, len, "/tmp/daybook-test-sql-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	for (size_t i = 0; i < n; i++) {
		char from[600], to[600], *text;
		snprintf(from, sizeof(from), "%s/%s", src, names[i]);
		snprintf(to, sizeof(to), "%s/%s", dir, names[i]);
		text = read_file(from);
		write_file(to, text, "w");
		free(text);
	}
	cr_assert_gt(n, 1, "no migrations in %s", src);
	return n;
}

static void remove_dir(const char *dir)
{
	char names[64][256];
	size_t n = list_sql(dir, names, 64);

	for (size_t i = 0; i < n; i++) {
		char path[600];
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	rmdir(dir);
}

/* daybook-admin migrate --dir dir against db, as the superuser. */
static void start_migrate(struct proc *p, const char *db, const char *dir)
{
	const char *argv[] = { env_required("DAYBOOK_ADMIN_BIN"), "migrate", "--dir", dir, NULL };
	char conninfo[512], pg[600];
	const char *vars[] = { pg, NULL };

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	snprintf(pg, sizeof(pg), "DAYBOOK_PG=%s", conninfo);
	proc_start(p, argv, vars);
}

/* daybook-admin migrate --dir dir --lock-timeout ms --lock-wait s against db. */
static void start_migrate_waiting(struct proc *p, const char *db, const char *dir, const char *ms,
				  const char *s)
{
	const char *argv[] = { env_required("DAYBOOK_ADMIN_BIN"),
			       "migrate",
			       "--dir",
			       dir,
			       "--lock-timeout",
			       ms,
			       "--lock-wait",
			       s,
			       NULL };
	char conninfo[512], pg[600];
	const char *vars[] = { pg, NULL };

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	snprintf(pg, sizeof(pg), "DAYBOOK_PG=%s", conninfo);
	proc_start(p, argv, vars);
}

/* Wait for a started migrate (at most 60 s). */
static void wait_migrate(struct proc *p)
{
	proc_wait(p, 60);
	cr_assert_not(p->timed_out, "migrate hung; stderr: %s", p->stderr_text);
}

static struct proc migrate(const char *db, const char *dir)
{
	struct proc p;

	start_migrate(&p, db, dir);
	wait_migrate(&p);
	return p;
}

static bool table_exists(const char *db, const char *table)
{
	char q[256];

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM pg_class WHERE relname = '%s' AND relkind = 'r'", table);
	return sql_int(db, q) == 1;
}

Test(admin_cli, migrate_applies_once_refuses_a_changed_file_and_applies_new_ones)
{
	char db[64], dir[64], names[64][256], expected[4096] = "", path[600], extra[600];
	size_t n, len = 0;
	char *original;
	struct proc p;

	n = copy_sql_dir(dir, sizeof(dir), names, 64);
	create_empty_db(db, sizeof(db));

	/* A fresh database: every file, in order, once. */
	for (size_t i = 0; i < n; i++)
		len += (size_t)snprintf(expected + len, sizeof(expected) - len, "applied %s\n",
					names[i]);
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, expected);
	proc_free(&p);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM schema_migrations"), (long long)n);
	cr_assert(table_exists(db, "events"));

	/* Again: nothing to do. */
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_not_null(strstr(p.stdout_text, "up to date"), "%s", p.stdout_text);
	cr_assert_null(strstr(p.stdout_text, "applied"), "%s", p.stdout_text);
	proc_free(&p);

	/* An applied file changes (and a new one waits): refused, nothing applied. */
	snprintf(path, sizeof(path), "%s/%s", dir, names[1]);
	original = read_file(path);
	write_file(path, "-- an innocent-looking edit\n", "a");
	snprintf(extra, sizeof(extra), "%s/999_extra.sql", dir);
	write_file(extra, "-- A later migration.\nCREATE TABLE extra (x int);\n", "w");
	p = migrate(db, dir);
	cr_assert_eq(p.status, 1, "stdout: %s stderr: %s", p.stdout_text, p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, names[1]), "stderr should name %s: %s", names[1],
			   p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "change"), "stderr should say it changed: %s",
			   p.stderr_text);
	cr_assert_null(strstr(p.stdout_text, "applied"), "%s", p.stdout_text);
	proc_free(&p);
	cr_assert_not(table_exists(db, "extra"), "a refused run applies nothing");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM schema_migrations"), (long long)n);

	/* Restored: only the new file is applied, recorded with its checksum. */
	write_file(path, original, "w");
	free(original);
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, "applied 999_extra.sql\n");
	proc_free(&p);
	cr_assert(table_exists(db, "extra"));
	{
		char *text = read_file(extra), hex[65], q[256];
		unsigned char d[DIGEST_SHA256_LEN];
		cr_assert(digest_sha256(text, strlen(text), d));
		digest_hex(d, DIGEST_SHA256_LEN, hex);
		free(text);
		snprintf(q, sizeof(q),
			 "SELECT count(*) FROM schema_migrations WHERE version = 999 AND "
			 "name = '999_extra.sql' AND checksum = '%s'",
			 hex);
		cr_assert_eq(sql_int(db, q), 1, "999 recorded with the file's SHA-256");
	}
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_not_null(strstr(p.stdout_text, "up to date"), "%s", p.stdout_text);
	proc_free(&p);

	drop_db(db);
	unlink(extra);
	remove_dir(dir);
}

Test(admin_cli, a_failing_migration_leaves_nothing_behind)
{
	char db[64], dir[64], names[64][256], path[600];
	struct proc p;

	copy_sql_dir(dir, sizeof(dir), names, 64);
	snprintf(path, sizeof(path), "%s/500_broken.sql", dir);
	write_file(path, "CREATE TABLE half (x int);\nSELECT 1 / 0;\n", "w");
	create_empty_db(db, sizeof(db));
	p = migrate(db, dir);
	cr_assert_eq(p.status, 1, "stdout: %s stderr: %s", p.stdout_text, p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "500_broken.sql"), "%s", p.stderr_text);
	cr_assert_null(strstr(p.stdout_text, "applied 500_broken.sql"), "%s", p.stdout_text);
	proc_free(&p);
	cr_assert_not(table_exists(db, "half"), "the failed migration was rolled back");
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM schema_migrations WHERE version = 500"), 0);
	cr_assert(table_exists(db, "events"), "the migrations before it stay applied");

	/* Fixed, it applies. */
	write_file(path, "CREATE TABLE half (x int);\n", "w");
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, "applied 500_broken.sql\n");
	proc_free(&p);
	cr_assert(table_exists(db, "half"));
	drop_db(db);
	remove_dir(dir);
}

/* Version v of account-long (v >= 2): the kind of each event by v % 4. */
static long long long_effect(int v)
{
	switch (v % 4) {
	case 0:
		return v; /* FundsDeposited */
	case 1:
		return -1; /* FundsWithdrawn */
	case 2:
		return 2; /* TransferReceived */
	default:
		return -3; /* TransferSent */
	}
}

/* account-long's balance after version v, folded here in C. */
static long long long_balance(int v)
{
	long long balance = 0;

	for (int i = 2; i <= v; i++)
		balance += long_effect(i);
	return balance;
}

/* Two long histories of the kinds of events a snapshot folds: account-long (USD, limit
 * 50, 2,345 events of every money kind) and account-shut (EUR, closed at version
 * 1000). Their snapshots, from 008, must be what the C fold says. */
static void add_long_history_to(const char *db)
{
	PQclear(sql(db,
		    "INSERT INTO events (stream, version, type, data, metadata) "
		    "SELECT 'account-long', 1, 'AccountOpened', '{\"account_id\":\"long\",\"name\":"
		    "\"L\",\"currency\":\"USD\",\"overdraft_limit\":50}'::jsonb, '{}'::jsonb UNION ALL "
		    "SELECT 'account-long', v, CASE v % 4 WHEN 0 THEN 'FundsDeposited' WHEN 1 THEN "
		    "'FundsWithdrawn' WHEN 2 THEN 'TransferReceived' ELSE 'TransferSent' END, "
		    "CASE v % 4 WHEN 0 THEN jsonb_build_object('amount', v) WHEN 1 THEN "
		    "'{\"amount\":1}' WHEN 2 THEN jsonb_build_object('transfer_id', 'r' || v, "
		    "'from', 'x', 'amount', 2) ELSE jsonb_build_object('transfer_id', 's' || v, "
		    "'to', 'x', 'amount', 3) END, '{}' FROM generate_series(2, 2345) v ORDER BY 2"));
	PQclear(sql(db,
		    "INSERT INTO events (stream, version, type, data, metadata) "
		    "SELECT 'account-shut', 1, 'AccountOpened', '{\"account_id\":\"shut\",\"name\":"
		    "\"S\",\"currency\":\"EUR\",\"overdraft_limit\":0}'::jsonb, '{}'::jsonb UNION ALL "
		    "SELECT 'account-shut', v, CASE v % 2 WHEN 0 THEN 'FundsDeposited' ELSE "
		    "'FundsWithdrawn' END, '{\"amount\":1}', '{}' FROM generate_series(2, 999) v "
		    "UNION ALL SELECT 'account-shut', 1000, 'AccountClosed', '{}', '{}' ORDER BY 2"));
}

static void assert_backfilled(const char *db, const char *id, int version, const char *currency,
			      long long balance, long long limit, bool closed)
{
	char q[1024];

	snprintf(q, sizeof(q),
		 "SELECT count(*) FROM account_snapshots WHERE stream = 'account-%s' "
		 "AND version = %d AND state = jsonb_build_object('account_id', '%s', 'currency', "
		 "'%s', 'balance', %lld, 'overdraft_limit', %lld, 'version', %d, 'closed', %s)",
		 id, version, id, currency, balance, limit, version, closed ? "true" : "false");
	cr_assert_eq(sql_int(db, q), 1, "account-%s: no snapshot at %d with balance %lld", id,
		     version, balance);
}

Test(admin_cli, migrate_adds_account_snapshots_to_a_database_with_history)
{
	char db[64], dir[64], names[64][256], path[600], *later[64] = { NULL };
	size_t n = 0;
	struct service command;
	struct response r;
	struct proc p;

	/* A database as it stood before 008, with an account's history in it. */
	n = copy_sql_dir(dir, sizeof(dir), names, 64);
	for (size_t i = 0; i < n; i++) {
		if (strcmp(names[i], "008") < 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		later[i] = read_file(path);
		unlink(path);
	}
	create_empty_db(db, sizeof(db));
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	proc_free(&p);
	cr_assert_not(table_exists(db, "account_snapshots"));
	PQclear(sql(db,
		    "INSERT INTO events (stream, version, type, data, metadata) VALUES "
		    "('account-old', 1, 'AccountOpened', '{\"account_id\":\"old\",\"name\":\"O\","
		    "\"currency\":\"EUR\",\"overdraft_limit\":0}', '{}'), "
		    "('account-old', 2, 'FundsDeposited', '{\"amount\":30}', '{}')"));
	add_long_history_to(db);

	/* The new binaries' migrate: 008 applies; the service loads the old history. */
	for (size_t i = 0; i < n; i++) {
		if (!later[i])
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		write_file(path, later[i], "w");
		free(later[i]);
	}
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	cr_assert_not_null(strstr(p.stdout_text, "applied 008_account_snapshots.sql\n"), "%s",
			   p.stdout_text);
	proc_free(&p);
	cr_assert(table_exists(db, "account_snapshots"));
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM account_snapshots"), 2,
		     "only the long histories get a snapshot");
	assert_backfilled(db, "long", 2000, "USD", long_balance(2000), 50, false);
	assert_backfilled(db, "shut", 1000, "EUR", 0, 0, true);
	harness_start_command(&command, db);
	r = post(&command, "/accounts/old/deposits", "{\"amount\":12}", NULL);
	cr_assert_eq(r.status, 201, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")), 42, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 3, "%s", r.body);
	response_free(&r);
	r = post(&command, "/accounts/long/deposits", "{\"amount\":12}", NULL);
	cr_assert_eq(r.status, 201, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "balance")),
		     long_balance(2345) + 12, "%s", r.body);
	cr_assert_eq(json_integer_value(json_object_get(r.json, "version")), 2346, "%s", r.body);
	response_free(&r);
	r = post(&command, "/accounts/shut/deposits", "{\"amount\":12}", NULL);
	cr_assert_eq(r.status, 422, "%s", r.body);
	response_free(&r);
	harness_stop(&command);
	drop_db(db);
	remove_dir(dir);
}

Test(admin_cli, two_databases_both_migrate_and_get_the_grants)
{
	const char *dir = env_required("DAYBOOK_SQL_DIR");
	char dbs[2][64];

	/* Roles are cluster-wide: the second database finds them already there. */
	for (size_t i = 0; i < 2; i++) {
		struct proc p;
		char conninfo[512];
		PGconn *conn;

		create_empty_db(dbs[i], sizeof(dbs[i]));
		p = migrate(dbs[i], dir);
		cr_assert_eq(p.status, 0, "migrating %s: %s", dbs[i], p.stderr_text);
		proc_free(&p);
		cr_assert_eq(sql_int(dbs[i], "SELECT count(*) FROM events"), 0);
		/* INSERT on the columns it decides (sql/011), not on txid or position. */
		cr_assert_eq(sql_int(dbs[i],
				     "SELECT has_column_privilege('daybook_command', 'events', "
				     "'stream', 'INSERT')::int"),
			     1);
		cr_assert_eq(sql_int(dbs[i],
				     "SELECT has_table_privilege('daybook_query', 'events', "
				     "'SELECT')::int"),
			     1);
		harness_conninfo(dbs[i], "daybook_command", conninfo, sizeof(conninfo));
		conn = PQconnectdb(conninfo);
		cr_assert(PQstatus(conn) == CONNECTION_OK, "daybook_command on %s: %s", dbs[i],
			  PQerrorMessage(conn));
		PQfinish(conn);
	}
	for (size_t i = 0; i < 2; i++)
		drop_db(dbs[i]);
}

Test(admin_cli, concurrent_migrates_of_one_database_apply_each_file_once)
{
	char db[64], dir[64], names[64][256];
	struct proc a, b;
	size_t n, applied = 0;

	n = copy_sql_dir(dir, sizeof(dir), names, 64);
	create_empty_db(db, sizeof(db));
	start_migrate(&a, db, dir);
	start_migrate(&b, db, dir);
	proc_wait(&a, 60);
	proc_wait(&b, 60);
	cr_assert_eq(a.status, 0, "first: %s", a.stderr_text);
	cr_assert_eq(b.status, 0, "second: %s", b.stderr_text);
	for (size_t i = 0; i < n; i++) {
		char line[300];
		snprintf(line, sizeof(line), "applied %.255s\n", names[i]);
		applied += (strstr(a.stdout_text, line) != NULL) +
			   (strstr(b.stdout_text, line) != NULL);
	}
	cr_assert_eq(applied, n, "each file applied by exactly one of them:\n%s---\n%s",
		     a.stdout_text, b.stdout_text);
	cr_assert_eq(sql_int(db, "SELECT count(*) FROM schema_migrations"), (long long)n);
	proc_free(&a);
	proc_free(&b);
	drop_db(db);
	remove_dir(dir);
}

/* --- command lines: --help, --version, exit codes (docs/cli.md) ----------------------- */

Test(admin_cli, every_binary_answers_help_and_version_without_any_configuration)
{
	static const char *const bins[][2] = { { "DAYBOOK_COMMAND_BIN", "daybook-command" },
					       { "DAYBOOK_QUERY_BIN", "daybook-query" },
					       { "DAYBOOK_PROJECTOR_BIN", "daybook-projector" },
					       { "DAYBOOK_ADMIN_BIN", "daybook-admin" } };
	static const char *const flags[][2] = {
		{ "--help", "usage: " }, { "-h", "usage: " }, { "--version", "" }, { "-V", "" }
	};

	for (size_t b = 0; b < sizeof(bins) / sizeof(bins[0]); b++) {
		for (size_t f = 0; f < sizeof(flags) / sizeof(flags[0]); f++) {
			const char *argv[] = { env_required(bins[b][0]), flags[f][0], NULL };
			struct proc p = run(argv, NULL, 10); /* no DAYBOOK_* at all */
			char prefix[64], name[64];
			int major = -1, minor = -1, patch = -1;

			cr_assert_eq(p.status, 0, "%s %s: %d, stderr: %s", bins[b][1], flags[f][0],
				     p.status, p.stderr_text);
			cr_assert_str_eq(p.stderr_text, "", "%s %s", bins[b][1], flags[f][0]);
			snprintf(prefix, sizeof(prefix), "%s%s", flags[f][1], bins[b][1]);
			cr_assert_eq(strncmp(p.stdout_text, prefix, strlen(prefix)), 0, "%s %s: %s",
				     bins[b][1], flags[f][0], p.stdout_text);
			if (flags[f][1][0] == '\0') {
				/* "daybook-x 0.1.0 (commit)" or "daybook-x 0.1.0": one line */
				cr_assert_eq(sscanf(p.stdout_text, "%63s %d.%d.%d", name, &major,
						    &minor, &patch),
					     4, "%s", p.stdout_text);
				cr_assert_str_eq(name, bins[b][1]);
				cr_assert_eq(count_lines(p.stdout_text), 1, "%s", p.stdout_text);
			}
			proc_free(&p);
		}
	}
}

Test(admin_cli, each_admin_command_has_its_own_help_without_a_database)
{
	static const char *const commands[] = { "migrate", "rebuild", "verify", "status", "token" };
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");

	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const char *forms[] = { "--help", "-h" };
		for (size_t k = 0; k < 2; k++) {
			const char *argv[] = { bin, commands[i], forms[k], NULL };
			struct proc p = run(argv, NULL, 10);
			char head[64];

			snprintf(head, sizeof(head), "usage: daybook-admin %s", commands[i]);
			cr_assert_eq(p.status, 0, "%s %s: %d %s", commands[i], forms[k], p.status,
				     p.stderr_text);
			cr_assert_eq(strncmp(p.stdout_text, head, strlen(head)), 0, "%s",
				     p.stdout_text);
			cr_assert_not_null(strstr(p.stdout_text, "Exit status"), "%s",
					   p.stdout_text);
			cr_assert_str_eq(p.stderr_text, "");
			proc_free(&p);
		}
	}
}

Test(admin_cli, admin_usage_errors_exit_2_naming_the_argument)
{
	static const char *const cases[][4] = {
		{ "migrate", "--dir", NULL, "needs a value" },
		{ "migrate", "--frobnicate", NULL, "--frobnicate" },
		{ "migrate", "extra", NULL, "extra" },
		{ "migrate", "--lock-timeout", "0", "--lock-timeout" },
		{ "migrate", "--lock-timeout", "2s", "'2s'" },
		{ "migrate", "--lock-wait", "-1", "--lock-wait" },
		{ "migrate", "--lock-wait", "", "--lock-wait" },
		{ "rebuild", "everything", NULL, "everything" },
		{ "rebuild", "sql", "more", "more" },
		{ "verify", "--json", NULL, "--json" },
		{ "status", "--no-redis", NULL, "--no-redis" },
	};
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");
	const char *env[] = { "DAYBOOK_PG=host=127.0.0.1 port=1 dbname=none connect_timeout=1",
			      NULL };

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *argv[] = { bin, cases[i][0], cases[i][1], cases[i][2], NULL };
		struct proc p = run(argv, env, 10);

		cr_assert_eq(p.status, 2, "%s %s: %d %s", cases[i][0], cases[i][1], p.status,
			     p.stderr_text);
		cr_assert_not_null(strstr(p.stderr_text, cases[i][3]), "%s", p.stderr_text);
		cr_assert_str_eq(p.stdout_text, "");
		proc_free(&p);
	}
}

Test(admin_cli, an_unreachable_postgresql_exits_3_from_every_admin_command)
{
	static const char *const commands[][2] = { { "migrate", NULL },
						   { "rebuild", "sql" },
						   { "verify", "--no-redis" },
						   { "status", NULL } };
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");
	const char *env[] = { "DAYBOOK_PG=host=127.0.0.1 port=1 dbname=none connect_timeout=1",
			      NULL };

	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const char *argv[] = { bin, commands[i][0], commands[i][1], NULL };
		struct proc p = run(argv, env, 30);

		cr_assert_eq(p.status, 3, "%s: %d, stdout: %s stderr: %s", commands[i][0], p.status,
			     p.stdout_text, p.stderr_text);
		proc_free(&p);
	}
}

/* Off a terminal (stdout and stderr are files here) rebuild writes JSON lines to the end,
 * its errors and its final line included; a libpq error stays on one line. */
Test(admin_cli, rebuild_off_a_terminal_writes_json_lines_to_the_end_even_when_it_fails)
{
	const char *argv[] = { env_required("DAYBOOK_ADMIN_BIN"), "rebuild", "sql", NULL };
	const char *env[] = { "DAYBOOK_PG=host=127.0.0.1 port=1 dbname=none connect_timeout=1",
			      NULL };
	struct proc p = run(argv, env, 30);
	json_t *last = NULL;
	size_t lines = 0;

	cr_assert_eq(p.status, 3, "%d %s", p.status, p.stderr_text);
	for (char *line = p.stdout_text, *nl; *line; line = nl + 1) {
		json_error_t error;
		nl = strchr(line, '\n');
		cr_assert_not_null(nl, "an unterminated line: %s", line);
		json_decref(last);
		last = json_loadb(line, (size_t)(nl - line), 0, &error);
		cr_assert(json_is_object(last), "not a JSON line: %.*s", (int)(nl - line), line);
		lines++;
	}
	cr_assert_geq(lines, 2, "%s", p.stdout_text);
	cr_assert_str_eq(json_string_value(json_object_get(last, "phase")), "failed");
	cr_assert_not_null(strstr(json_string_value(json_object_get(last, "error")),
				  "cannot connect to PostgreSQL"),
			   "%s", p.stdout_text);
	cr_assert_null(strchr(json_string_value(json_object_get(last, "error")), '\n'));
	json_decref(last);
	proc_free(&p);
}

/* --- daybook-admin token new: the token bootstrap ------------------------------------- */

/* Run `daybook-admin token new --id id --scopes scopes` with no configuration at all
 * (no DAYBOOK_PG): it needs none. */
static struct proc token_new(const char *id, const char *scopes)
{
	const char *argv[] = { env_required("DAYBOOK_ADMIN_BIN"),
			       "token",
			       "new",
			       "--id",
			       id,
			       "--scopes",
			       scopes,
			       NULL };

	return run(argv, NULL, 10);
}

Test(admin_cli, token_new_prints_a_token_and_a_tokens_file_line_that_accepts_it)
{
	struct proc p = token_new("ci-writer", "write,read");
	char token[256], line[512], path[] = "/tmp/daybook-tokens-XXXXXX", err[256];
	unsigned char digest[DIGEST_SHA256_LEN];
	char hex[DIGEST_SHA256_HEX_LEN + 1], want[512];
	struct tokens *tokens = NULL;
	const struct token *found;
	FILE *f;
	int fd;

	cr_assert_eq(p.status, 0, "%s", p.stderr_text);
	cr_assert_eq(count_lines(p.stdout_text), 2, "%s", p.stdout_text);
	cr_assert_eq(sscanf(p.stdout_text, "%255[^\n]\n%511[^\n]", token, line), 2);
	cr_assert(strncmp(token, "dbk_", 4) == 0 && strlen(token) == 4 + 64, "%s", token);
	cr_assert(digest_sha256(token, strlen(token), digest));
	digest_hex(digest, DIGEST_SHA256_LEN, hex);
	snprintf(want, sizeof(want), "ci-writer %s write,read", hex);
	cr_assert_str_eq(line, want);
	cr_assert_null(strstr(p.stderr_text, token), "the token is printed once, on stdout");

	/* The line, as the services load it, accepts the token with its scopes. */
	fd = mkstemp(path);
	cr_assert(fd >= 0);
	f = fdopen(fd, "w"); /* the tokens file under test */
	cr_assert_not_null(f);
	fprintf(f, "%s\n", line);
	cr_assert_eq(fclose(f), 0);
	cr_assert_eq(tokens_open(&tokens, path, err, sizeof(err)), 0, "%s", err);
	found = tokens_find(tokens, token, strlen(token));
	cr_assert_not_null(found);
	cr_assert_str_eq(found->id, "ci-writer");
	cr_assert_eq(found->scopes, SCOPE_WRITE | SCOPE_READ);
	cr_assert_null(tokens_find(tokens, "dbk_guess", 9));
	tokens_close(&tokens);
	unlink(path);
	proc_free(&p);
}

Test(admin_cli, token_new_makes_a_different_token_each_time)
{
	struct proc a = token_new("reader", "read"), b = token_new("reader", "read");

	cr_assert_eq(a.status, 0, "%s", a.stderr_text);
	cr_assert_eq(b.status, 0, "%s", b.stderr_text);
	cr_assert_str_neq(a.stdout_text, b.stdout_text);
	proc_free(&a);
	proc_free(&b);
}

Test(admin_cli, token_new_refuses_a_bad_id_or_bad_scopes_and_prints_no_token)
{
	static const char *const bad[][2] = {
		{ "has space", "read" }, { "", "read" },          { "ok", "" },
		{ "ok", "reed" },        { "ok", "read,,write" }, { "ok", "read," },
		{ "ok", "read,read" },   { "ok", "write read" },
	};
	const char *bin = env_required("DAYBOOK_ADMIN_BIN");
	const char *missing[] = { bin, "token", "new", "--id", "x", NULL },
		   *unknown[] = { bin, "token", "old", NULL };
	struct proc p;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		p = token_new(bad[i][0], bad[i][1]);
		cr_assert_eq(p.status, 2, "--id '%s' --scopes '%s': %d", bad[i][0], bad[i][1],
			     p.status);
		cr_assert_str_eq(p.stdout_text, "");
		cr_assert_neq(strlen(p.stderr_text), 0);
		proc_free(&p);
	}
	p = run(missing, NULL, 10);
	cr_assert_eq(p.status, 2);
	cr_assert_not_null(strstr(p.stderr_text, "--scopes"), "%s", p.stderr_text);
	cr_assert_str_eq(p.stdout_text, "");
	proc_free(&p);
	p = run(unknown, NULL, 10);
	cr_assert_eq(p.status, 2);
	cr_assert_str_eq(p.stdout_text, "");
	proc_free(&p);
}

/* PostgreSQL's error for a bad migration spans lines (ERROR, LINE, a caret): the admin
 * tool reports it on one. */
Test(admin_cli, a_migration_error_is_reported_on_one_line)
{
	char db[64], dir[64], names[64][256], path[600];
	struct proc p;

	copy_sql_dir(dir, sizeof(dir), names, 64);
	snprintf(path, sizeof(path), "%s/500_typo.sql", dir);
	write_file(path, "SELECT 1;\nSELEC 2;\n", "w");
	create_empty_db(db, sizeof(db));
	p = migrate(db, dir);
	cr_assert_eq(p.status, 1, "stdout: %s stderr: %s", p.stdout_text, p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "syntax error"), "%s", p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "LINE 2"), "%s", p.stderr_text);
	cr_assert_eq(count_lines(p.stderr_text), 1, "one line: %s", p.stderr_text);
	proc_free(&p);
	remove_dir(dir);
}

/* A migration that needs a table's exclusive lock while a long transaction reads the
 * table gives way: it waits at most --lock-timeout for the lock, so appends and reads
 * queued behind it wait no longer than that, and tries again until the reader is gone
 * (or fails after --lock-wait, with nothing of it applied). */
Test(admin_cli, migrate_gives_way_to_a_long_transaction_and_tries_again)
{
	char db[64], dir[64], names[64][256], extra[600];
	PGconn *reader, *other;
	struct proc p;
	char code[6];

	copy_sql_dir(dir, sizeof(dir), names, 64);
	create_empty_db(db, sizeof(db));
	p = migrate(db, dir);
	cr_assert_eq(p.status, 0, "stderr: %s", p.stderr_text);
	proc_free(&p);
	snprintf(extra, sizeof(extra), "%s/999_exclusive.sql", dir);
	write_file(extra,
		   "-- Needs events' exclusive lock, as DROP TRIGGER or ALTER TABLE do.\n"
		   "LOCK TABLE events IN ACCESS EXCLUSIVE MODE;\nCREATE TABLE exclusive_done (x int);\n",
		   "w");
	reader = harness_connect_as(db, NULL);
	other = harness_connect_as(db, NULL);
	PQclear(PQexec(reader, "BEGIN"));
	PQclear(PQexec(reader, "SELECT count(*) FROM events")); /* its lock lasts to COMMIT */

	/* Never granted within --lock-wait: refused, nothing applied, the reason said. */
	start_migrate_waiting(&p, db, dir, "200", "1");
	wait_migrate(&p);
	cr_assert_eq(p.status, 1, "stdout: %s stderr: %s", p.stdout_text, p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "999_exclusive.sql"), "%s", p.stderr_text);
	cr_assert_not_null(strstr(p.stderr_text, "lock"), "%s", p.stderr_text);
	proc_free(&p);
	cr_assert_not(table_exists(db, "exclusive_done"));

	/* While it waits, the table's other users are held for a lock timeout at most (a
	 * read queued behind the waiting exclusive lock would otherwise wait for the
	 * reader's whole transaction, here beyond its 5 s statement timeout). */
	start_migrate_waiting(&p, db, dir, "300", "60");
	PQclear(PQexec(other, "SET statement_timeout = '5s'"));
	for (int i = 0; i < 10; i++) {
		cr_assert_str_eq(harness_sqlstate(other, "SELECT count(*) FROM events", code), "",
				 "a read of events waited behind the migration");
		usleep(100000);
	}
	PQclear(PQexec(reader, "COMMIT"));
	wait_migrate(&p);
	cr_assert_eq(p.status, 0, "stdout: %s stderr: %s", p.stdout_text, p.stderr_text);
	cr_assert_not_null(strstr(p.stdout_text, "applied 999_exclusive.sql"), "%s", p.stdout_text);
	cr_assert_not_null(strstr(p.stderr_text, "trying again"), "%s", p.stderr_text);
	proc_free(&p);
	cr_assert(table_exists(db, "exclusive_done"));
	PQfinish(reader);
	PQfinish(other);
	remove_dir(dir);
}
