/* Integration-test harness: one value from a service's Prometheus /metrics. */
#include "harness.h"
#include "harness_internal.h"

#include <stdlib.h>
#include <string.h>

double harness_metric(const struct service *svc, const char *name)
{
	struct response r = http_request(svc->port, "GET", "/metrics", NULL, NULL, 5);
	size_t n = strlen(name);
	double v = -1;

	for (const char *p = r.body; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
		if (strncmp(p, name, n) == 0 && p[n] == ' ') {
			v = strtod(p + n + 1, NULL);
			break;
		}
	}
	response_free(&r);
	return v;
}

struct metric_wanted {
	const struct service *svc;
	const char *name;
	double value;
};

static bool metric_is(void *arg)
{
	struct metric_wanted *w = arg;
	return harness_metric(w->svc, w->name) == w->value;
}

bool harness_wait_metric(const struct service *svc, const char *name, double value, double deadline)
{
	struct metric_wanted w = { svc, name, value };

	return harness_wait_until(metric_is, &w, deadline);
}
