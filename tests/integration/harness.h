/* Integration-test harness: a fresh migrated database per test, the real service
 * binaries on free loopback ports, a blocking HTTP client, and SQL helpers. Implemented
 * by harness_*.c, one file per concern (processes, services, pg, redis, http, metrics,
 * model, readers, stack, proxy). */
#ifndef DAYBOOK_TEST_HARNESS_H
#define DAYBOOK_TEST_HARNESS_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Tokens every test service accepts (see harness_services.c). */
#define TOKEN_WRITE "test-write-token"
#define TOKEN_READ "test-read-token"
#define TOKEN_ADMIN "test-admin-token"

struct service {
	pid_t pid;
	int port;
	char name[32];
	char log_path[512];
};

struct response {
	int status;
	char *headers; /* the raw status line and header block */
	char *body;
	json_t *json; /* parsed body, or NULL */
};

/* A loopback TCP port that was free a moment ago. */
int harness_free_port(void);

/* A fresh database with every migration applied; its name goes into db (64 bytes). */
void harness_db_create(char *db, size_t len);
/* A conninfo for db as role (NULL: the superuser), into out. */
void harness_conninfo(const char *db, const char *role, char *out, size_t len);

/* Start daybook-command against db and wait until /readyz says ready (it leads). */
void harness_start_command(struct service *svc, const char *db);
/* The same with extra environment: NULL-terminated name, value pairs. */
void harness_start_command_env(struct service *svc, const char *db, const char *const *env);
/* Start another daybook-command (env may be NULL) and wait until it is ready or stands
 * by for the one that leads (/readyz 503 "standby"). */
void harness_start_command_standby(struct service *svc, const char *db, const char *const *env);
/* Start daybook-query against db (as role daybook_query) and Redis at redis_url
 * (redis://host:port/db), and wait until /readyz says ready. */
void harness_start_query(struct service *svc, const char *db, const char *redis_url);
/* The same with extra environment: NULL-terminated name, value pairs. */
void harness_start_query_env(struct service *svc, const char *db, const char *redis_url,
			     const char *const *env);
/* Start daybook-projector against db and redis_url (its metrics port is svc->port). */
void harness_start_projector(struct service *svc, const char *db, const char *redis_url);
/* The same three with DAYBOOK_PG set to conninfo as it is (a list of hosts, say): the
 * command service waited for until it leads, the others until ready. */
void harness_start_command_pg(struct service *svc, const char *conninfo, const char *const *env);
void harness_start_query_pg(struct service *svc, const char *conninfo, const char *redis_url);
void harness_start_projector_pg(struct service *svc, const char *conninfo, const char *redis_url);
/* Start a private redis-server on a free port (or on svc->port when `reuse_port`), with
 * the ACL users of deploy/redis-users.acl (the `default` user disabled); writes
 * redis://daybook-admin:<password>@127.0.0.1:<port> into url (at most
 * HARNESS_REDIS_URL_MAX bytes): what daybook-admin uses. harness_start_query and
 * harness_start_projector give their service its own user. Stop it with harness_kill. */
void harness_start_redis(struct service *svc, bool reuse_port, char *url, size_t len);
#define HARNESS_REDIS_URL_MAX 160
/* Start a redis-sentinel on a free port that monitors the Redis on redis_port as
 * "daybook" (quorum 1, as daybook-ops); writes
 * redis-sentinel://daybook-admin:<password>@127.0.0.1:<port>/daybook into url (at most
 * HARNESS_REDIS_URL_MAX bytes), which harness_start_query and harness_start_projector
 * accept (redis-server --sentinel). Stop it with harness_kill. */
void harness_start_sentinel(struct service *svc, int redis_port, char *url, size_t len);
/* url (of harness_start_redis) with the credentials of ACL user `user` instead; a URL
 * without a password (a server without users) is copied as it is. */
void harness_redis_url_as(const char *url, const char *user, char *out, size_t len);
/* A TCP proxy on a free loopback port in front of the Redis on target_port: every
 * connection to it is relayed both ways to its own connection to Redis, by a thread of
 * its own. Caller closes it with harness_proxy_close. */
struct redis_proxy;
void harness_proxy_open(struct redis_proxy **out, int target_port);
/* url (a redis://host:port URL, as harness_start_redis writes) with the proxy's address
 * instead of the server's, into out. */
void harness_proxy_url(const struct redis_proxy *p, const char *url, char *out, size_t len);
/* Arm the proxy (one shot): the first chunk a client sends from now on that contains
 * needle (at most 1024 bytes; a match may span two reads) goes to Redis; once Redis's
 * answer arrives it is dropped and both sockets of that connection are closed. Later
 * connections are relayed as before. */
void harness_proxy_lose_reply_to(struct redis_proxy *p, const char *needle);
/* Whether the armed answer was dropped. */
bool harness_proxy_lost_reply(struct redis_proxy *p);
/* Stop the thread, close every connection, free *p and NULL it; NULL is ignored. */
void harness_proxy_close(struct redis_proxy **p);
/* A blocking connection to a redis:// URL for checks, as daybook-ops (every right);
 * the test fails if it cannot. */
struct redisContext *harness_redis(const char *url);
/* The same as ACL user `user` (of deploy/redis-users.acl). */
struct redisContext *harness_redis_as(const char *url, const char *user);
/* The value of metric `name` (with labels, e.g. `x{a="b"}`) from svc's /metrics; -1 if absent. */
double harness_metric(const struct service *svc, const char *name);
/* Wait until metric `name` of svc equals value; false if it does not by deadline (a
 * harness_now() value). */
bool harness_wait_metric(const struct service *svc, const char *name, double value,
			 double deadline);
/* Seconds on the monotonic clock. */
double harness_now(void);
/* Wait on a condition, never a fixed sleep: call cond(arg) until it returns true (then
 * true) or the monotonic clock passes deadline (a harness_now() value; then false, after
 * one last call). Polls every HARNESS_POLL_US; cond runs at least once. */
bool harness_wait_until(bool (*cond)(void *arg), void *arg, double deadline);
#define HARNESS_POLL_US 20000
/* Wait until *counter (bumped by another thread, e.g. a load's writes) reaches at_least;
 * false if it has not by deadline. */
bool harness_wait_count(atomic_int *counter, int at_least, double deadline);

/* The log head and the SQL checkpoint as position tokens. */
void harness_log_head(const char *db, char *out, size_t len);
void harness_sql_checkpoint(const char *db, char *out, size_t len);
/* The live Redis generation and its checkpoint; false when there is none. */
bool harness_redis_live(struct redisContext *c, long long *gen, char *cp, size_t len);
/* Wait until the SQL read models have applied the whole log (the SQL checkpoint is the
 * log head); false if they have not by deadline (a harness_now() value). */
bool harness_wait_sql_caught_up(const char *db, double deadline);
/* Wait until SQL and Redis read models have applied the whole log (fails on timeout). */
void harness_wait_caught_up(const char *db, const char *redis_url, double timeout);
/* The SQL read models equal a fold of the log computed independently in SQL. */
void harness_assert_models_match_log(const char *db);
/* Redis's live generation holds exactly the SQL models' accounts, byte for byte. */
void harness_assert_redis_matches_sql(const char *db, const char *redis_url);

/* Readers: threads reading GET /accounts/{id} from a query service, in a loop, over the
 * given accounts; every answer that is not a 200 with a body counts as an error. */
struct read_sample {
	char account[65];
	int version;
	long long balance;
};
struct readers;
struct readers *harness_readers_start(const struct service *query, const char *const *accounts,
				      size_t naccounts, int threads);
/* Stop them; *samples (caller frees) holds what they saw. */
void harness_readers_stop(struct readers *r, int *reads, int *errors, struct read_sample **samples,
			  size_t *nsamples);
/* Every sampled balance is the log's balance of that account at that version. */
void harness_assert_samples_true(const char *db, const struct read_sample *s, size_t n);

/* A suite's stack: its fresh database and the services on it. A service whose pid is 0
 * is not running (never started, or stopped). What a suite starts beyond its fixture
 * (with harness_start_*) it may start into these too, and harness_stack_stop stops it. */
struct stack {
	char db[64];
	char redis_url[HARNESS_REDIS_URL_MAX]; /* daybook-admin's, as harness_start_redis */
	struct service redis, command, projector, query;
};
/* Fixtures for a suite's setup: each zeroes *s, makes a fresh migrated database (s->db),
 * then starts what its name says, in that order, each waited for until ready: */
/* the command service (s->command); */
void harness_stack_command(struct stack *s);
/* Redis (s->redis, its URL into s->redis_url); */
void harness_stack_redis(struct stack *s);
/* Redis, the command service and a projector (s->projector). */
void harness_stack_redis_command_projector(struct stack *s);
/* The teardown that goes with them: stops (harness_stop) the query service, the
 * projector and the command service, in that order, then kills Redis; passes over
 * whatever is not running. */
void harness_stack_stop(struct stack *s);

/* SIGTERM and wait; returns the exit status (or -1 if it had to be killed). */
int harness_stop(struct service *svc);
/* SIGKILL and reap. */
void harness_kill(struct service *svc);
/* Copy a service's log (debug level) to stderr: for a failure to be diagnosed from the
 * test output alone, since the logs go with the test's temporary directory. */
void harness_print_log(const struct service *svc);
/* Whether a line of svc's log contains text; the test fails if the log cannot be read. */
bool harness_log_says(const struct service *svc, const char *text);
/* Wait until svc's log says text; false if it has not by deadline (a harness_now() value). */
bool harness_wait_log(const struct service *svc, const char *text, double deadline);
/* The cluster's transactions that hold a transaction id, oldest first, to stderr: any
 * of them holds back pg_snapshot_xmin, below which projectors read. */
void harness_print_xid_holders(void);
/* Wait until GET path answers `status` (timeout in seconds); false on timeout. */
bool harness_wait_status(const struct service *svc, const char *path, int status, double timeout);

/* One HTTP/1.1 request on a new connection. headers: NULL-terminated "Name: value"
 * strings, or NULL. body may be NULL. status is 0 when the request failed at the
 * socket level (refused, reset, timed out after timeout_s). Free with response_free. */
struct response http_request(int port, const char *method, const char *path,
			     const char *const *headers, const char *body, double timeout_s);
void response_free(struct response *r);
/* The value of a response header (case-insensitive name) into out; false if absent. */
bool response_header(const struct response *r, const char *name, char *out, size_t len);

/* POST JSON with the write token (plus extra headers, NULL-terminated, may be NULL). */
struct response post(const struct service *svc, const char *path, const char *body,
		     const char *const *extra);
/* POST JSON with the write token; the test fails unless the answer is 201. */
void harness_post_created(const struct service *svc, const char *path, const char *body);
/* The same, with the answer's position token into pos (len bytes; pos may be NULL). */
void harness_post_created_at(const struct service *svc, const char *path, const char *body,
			     char *pos, size_t len);

/* Blocking SQL as superuser on db; the test fails on any error. Caller PQclear()s. */
PGresult *sql(const char *db, const char *query);
/* The first column of the first row as a 64-bit integer. */
long long sql_int(const char *db, const char *query);
/* A blocking connection to db as role (NULL: the superuser); the test fails if it cannot
 * connect. Caller PQfinish()es. */
PGconn *harness_connect_as(const char *db, const char *role);
/* Run one statement on conn; its SQLSTATE ("" for success) goes into code, returned. */
const char *harness_sqlstate(PGconn *conn, const char *query, char code[6]);

/* Run daybook-admin with args (NULL-terminated, after the program's name) against db as
 * the superuser, with DAYBOOK_REDIS set to redis_url (NULL: unset), to its end; returns
 * its exit status (-1 if a signal ended it). With out, its stdout and stderr together go
 * into *out (caller frees); without, both go to the test's stderr (stdout is the test
 * protocol's). */
int harness_admin(const char *db, const char *redis_url, const char *const *args, char **out);
/* Apply every migration to db (daybook-admin migrate); the test fails if it fails. */
void harness_migrate(const char *db);

/* Run a shell command from the environment variable `var` (e.g. DAYBOOK_TEST_PG_STOP). */
void harness_run_env_command(const char *var);

#endif
