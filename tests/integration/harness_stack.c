/* Integration-test harness: the fixtures that start a suite's stack (a fresh database,
 * Redis, the services) and the teardown that stops whatever of it is running. */
#include "harness.h"

#include <stdbool.h>
#include <string.h>

void harness_stack_command(struct stack *s)
{
	memset(s, 0, sizeof(*s));
	harness_db_create(s->db, sizeof(s->db));
	harness_start_command(&s->command, s->db);
}

void harness_stack_redis(struct stack *s)
{
	memset(s, 0, sizeof(*s));
	harness_db_create(s->db, sizeof(s->db));
	harness_start_redis(&s->redis, false, s->redis_url, sizeof(s->redis_url));
}

void harness_stack_redis_command_projector(struct stack *s)
{
	harness_stack_redis(s);
	harness_start_command(&s->command, s->db);
	harness_start_projector(&s->projector, s->db, s->redis_url);
}

void harness_stack_stop(struct stack *s)
{
	/* harness_stop and harness_kill pass over a service that is not running. */
	harness_stop(&s->query);
	harness_stop(&s->projector);
	harness_stop(&s->command);
	harness_kill(&s->redis);
}
