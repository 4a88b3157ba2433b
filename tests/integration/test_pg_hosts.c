/* PostgreSQL named by a list of hosts whose first one hangs (it takes connections and
 * never answers: a stopped postmaster, a storage stall, a black hole): every service
 * moves on to the next host after that host's deadline, as libpq does in a blocking
 * connect, instead of starting every attempt at the hung host again. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

static char db[64];
static struct service command, projector, query, redis;
static int hung = -1; /* a listener whose connections are never accepted */
static int hung_port;

static void setup(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);

	harness_db_create(db, sizeof(db));
	/* Connections complete in the kernel's backlog and wait there: their startup
	 * packets go unanswered, and once the backlog is full, so do their SYNs. */
	hung = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert(hung >= 0);
	cr_assert_eq(bind(hung, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(listen(hung, 16), 0);
	cr_assert_eq(getsockname(hung, (struct sockaddr *)&a, &len), 0);
	hung_port = ntohs(a.sin_port);
}

static void teardown(void)
{
	struct service *running[] = { &query, &projector, &command };

	for (size_t i = 0; i < sizeof(running) / sizeof(running[0]); i++)
		if (running[i]->pid > 0)
			harness_stop(running[i]);
	if (redis.pid > 0)
		harness_kill(&redis);
	if (hung >= 0)
		close(hung);
}

TestSuite(pg_hosts, .init = setup, .fini = teardown, .timeout = 120);

/* role's connection string for the test database that lists the hung listener first and
 * the test cluster second, with target_session_attrs as HA deployments have it: as
 * key=value settings without connect_timeout (each host then gets the service's
 * default), or as a URI with connect_timeout=2. */
/* The test cluster's host and port (in the returned options: PQconninfoFree them). */
static PQconninfoOption *cluster(const char *role, const char **host, const char **port)
{
	char plain[512];
	PQconninfoOption *opts;

	harness_conninfo(db, role, plain, sizeof(plain));
	opts = PQconninfoParse(plain, NULL);
	cr_assert_not_null(opts);
	*host = *port = NULL;
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		if (strcmp(o->keyword, "host") == 0)
			*host = o->val;
		else if (strcmp(o->keyword, "port") == 0)
			*port = o->val;
	}
	cr_assert(*host && *port, "%s", plain);
	return opts;
}

static void hung_first(const char *role, bool uri, char *out, size_t len)
{
	const char *host, *port;
	PQconninfoOption *opts = cluster(role, &host, &port);

	if (uri)
		snprintf(out, len,
			 "postgresql://%s@127.0.0.1:%d,%s:%s/%s"
			 "?target_session_attrs=read-write&connect_timeout=2",
			 role, hung_port, host, port, db);
	else
		snprintf(out, len,
			 "host=127.0.0.1,%s port=%d,%s dbname=%s user=%s "
			 "target_session_attrs=read-write",
			 host, hung_port, port, db, role);
	PQconninfoFree(opts);
}

/* How many lines of svc's log say that the hung host did not answer. */
static int hung_host_lines(const struct service *svc)
{
	char text[96], line[4096];
	FILE *f = fopen(svc->log_path, "r");
	int n = 0;

	cr_assert_not_null(f, "cannot read %s", svc->log_path);
	snprintf(text, sizeof(text), "postgresql 127.0.0.1:%d did not answer within", hung_port);
	while (fgets(line, sizeof(line), f))
		n += strstr(line, text) != NULL;
	fclose(f);
	return n;
}

/* The service's log names the hung host as the one that timed out. */
static void assert_log_names_the_hung_host(const struct service *svc)
{
	if (hung_host_lines(svc) == 0) {
		harness_print_log(svc);
		cr_assert_fail("%s's log never says that 127.0.0.1:%d did not answer", svc->name,
			       hung_port);
	}
}

/* A deposit to h1 is answered 201 (a batch in flight when the sessions ended may be
 * answered 503). */
static bool deposited(void *arg)
{
	struct response r = post(&command, "/accounts/h1/deposits", "{\"amount\":7}", NULL);
	int status = r.status;

	(void)arg;
	response_free(&r);
	cr_assert(status == 201 || status == 503, "deposit: %d", status);
	return status == 201;
}

/* Before, each attempt spent its 5 s on the first host and the next began there again:
 * the service never became ready (harness_start_command_pg gives it 20 s). */
Test(pg_hosts, a_hung_first_host_leaves_the_command_service_writing_through_the_next)
{
	char pg[512];

	hung_first("daybook_command", false, pg, sizeof(pg));
	harness_start_command_pg(&command, pg, NULL);
	harness_post_created(&command, "/accounts",
			     "{\"id\":\"h1\",\"name\":\"H\",\"currency\":\"EUR\"}");
	harness_post_created(&command, "/accounts/h1/deposits", "{\"amount\":5}");
	assert_log_names_the_hung_host(&command);

	/* Its sessions end: it connects again at once, the hung host now last. */
	int seen = hung_host_lines(&command);
	char kill[256];
	snprintf(kill, sizeof(kill),
		 "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
		 "WHERE usename = 'daybook_command' AND datname = '%s'",
		 db);
	cr_assert_gt(sql_int(db, kill), 0);
	cr_assert(harness_wait_status(&command, "/readyz", 200, 20), "no reconnection");
	cr_assert(harness_wait_until(deposited, NULL, harness_now() + 20),
		  "no deposit went through after reconnecting");
	cr_assert_eq(hung_host_lines(&command), seen, "reconnecting tried the hung host first");
	cr_assert_geq(sql_int(db, "SELECT count(*) FROM events WHERE stream = 'account-h1'"), 3);
}

/* GET path from the query service with the read token: the answer must be 200 (else the
 * projector's and the query service's logs are printed). Caller frees. */
static struct response get_ok(const char *path)
{
	const char *auth[] = { "Authorization: Bearer " TOKEN_READ, NULL };
	struct response r = http_request(query.port, "GET", path, auth, NULL, 20);

	if (r.status != 200) {
		harness_print_log(&projector);
		harness_print_log(&query);
		cr_assert_fail("%s: %d %s", path, r.status, r.body);
	}
	return r;
}

/* The same for the projector (its own connections and its lease's) and the query
 * service (its workers' SQL pools and the event feed's reader), from a URI. */
Test(pg_hosts, a_hung_first_host_in_a_uri_leaves_the_projector_and_the_query_service_serving)
{
	char url[HARNESS_REDIS_URL_MAX], pg[512], pos[64], path[256];
	struct response r;

	harness_start_redis(&redis, false, url, sizeof(url));
	harness_start_command(&command, db);
	hung_first("daybook_projector", true, pg, sizeof(pg));
	harness_start_projector_pg(&projector, pg, url);
	hung_first("daybook_query", true, pg, sizeof(pg));
	harness_start_query_pg(&query, pg, url);
	harness_post_created_at(&command, "/accounts",
				"{\"id\":\"h2\",\"name\":\"H\",\"currency\":\"EUR\"}", pos,
				sizeof(pos));

	/* Projected: the projector is through. Other tests' transactions may hold the
	 * cluster's horizon, below which it reads, back for a while: hence the minute. */
	if (!harness_wait_sql_caught_up(db, harness_now() + 60)) {
		harness_print_log(&projector);
		harness_print_xid_holders();
		cr_assert_fail("the projector did not apply the log within 60 s");
	}
	/* Read from the read models, */
	snprintf(path, sizeof(path), "/accounts/h2?min_position=%s&wait_ms=10000", pos);
	r = get_ok(path);
	response_free(&r);
	/* from the event store through the query service's own connections, */
	snprintf(path, sizeof(path), "/accounts/h2/events?min_position=%s&wait_ms=10000", pos);
	r = get_ok(path);
	cr_assert_eq(json_array_size(json_object_get(r.json, "events")), 1, "%s", r.body);
	response_free(&r);
	/* and from its event feed's. */
	r = get_ok("/events?limit=10");
	cr_assert(strstr(r.body, "account-h2"), "%s", r.body);
	response_free(&r);
	assert_log_names_the_hung_host(&projector);
	assert_log_names_the_hung_host(&query);
}

/* A list of hosts that names no database connects to libpq's default one (here
 * PGDATABASE), as a single host does: the services' own defaults once also sent the
 * whole string as the database's name. */
Test(pg_hosts, a_list_of_hosts_without_a_database_takes_libpqs_default)
{
	char pg[512], env_db[80];
	const char *host, *port;
	PQconninfoOption *opts = cluster("daybook_command", &host, &port);

	snprintf(pg, sizeof(pg), "host=%s,%s port=%s,%s user=daybook_command", host, host, port,
		 port);
	PQconninfoFree(opts);
	snprintf(env_db, sizeof(env_db), "%s", db);
	harness_start_command_pg(&command, pg, (const char *const[]){ "PGDATABASE", env_db, NULL });
	harness_post_created(&command, "/accounts",
			     "{\"id\":\"h3\",\"name\":\"H\",\"currency\":\"EUR\"}");
}
