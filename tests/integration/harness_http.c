/* Integration-test harness: a blocking HTTP/1.1 client, one request per connection. */
#include "harness.h"
#include "harness_internal.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static bool send_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return false;
		p += w;
		n -= (size_t)w;
	}
	return true;
}

/* Read until EOF or timeout; the buffer is NUL-terminated. */
static char *recv_all(int fd, double deadline, size_t *len)
{
	size_t cap = 8192, n = 0;
	char *buf = malloc(cap);

	while (buf) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left = (int)((deadline - harness_now()) * 1000);
		ssize_t r;
		if (left <= 0 || poll(&p, 1, left) <= 0)
			break;
		if (n + 4096 > cap) {
			char *grown = realloc(buf, cap *= 2);
			if (!grown)
				break;
			buf = grown;
		}
		r = recv(fd, buf + n, cap - n - 1, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			buf[n] = '\0';
			*len = n;
			return buf;
		}
		n += (size_t)r;
	}
	free(buf);
	return NULL; /* timed out or failed: no complete response */
}

static void parse_response(struct response *resp, char *raw)
{
	char *sep = strstr(raw, "\r\n\r\n");

	if (!sep || sscanf(raw, "HTTP/1.%*d %d", &resp->status) != 1) {
		resp->status = 0;
		return;
	}
	*sep = '\0';
	resp->headers = strdup(raw);
	resp->body = strdup(sep + 4);
	resp->json = json_loads(resp->body, 0, NULL);
}

struct response http_request(int port, const char *method, const char *path,
			     const char *const *headers, const char *body, double timeout_s)
{
	struct response resp = { 0 };
	struct sockaddr_in a = { .sin_family = AF_INET,
				 .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	size_t blen = body ? strlen(body) : 0, rlen, n;
	char head[16384], *raw;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	double deadline = harness_now() + timeout_s;

	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
		goto done;
	n = (size_t)snprintf(head, sizeof(head),
			     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", method,
			     path);
	for (size_t i = 0; headers && headers[i] && n < sizeof(head); i++)
		n += (size_t)snprintf(head + n, sizeof(head) - n, "%s\r\n", headers[i]);
	if (body && n < sizeof(head))
		n += (size_t)snprintf(head + n, sizeof(head) - n, "Content-Length: %zu\r\n", blen);
	if (n < sizeof(head))
		n += (size_t)snprintf(head + n, sizeof(head) - n, "\r\n");
	cr_assert(n < sizeof(head), "request head too long");
	if (!send_all(fd, head, n) || (body && !send_all(fd, body, blen)))
		goto done;
	raw = recv_all(fd, deadline, &rlen);
	if (raw) {
		parse_response(&resp, raw);
		free(raw);
	}
done:
	if (fd >= 0)
		close(fd);
	return resp;
}

void response_free(struct response *r)
{
	free(r->headers);
	free(r->body);
	json_decref(r->json);
	memset(r, 0, sizeof(*r));
}

bool response_header(const struct response *r, const char *name, char *out, size_t len)
{
	size_t n = strlen(name);

	for (const char *p = r->headers; p && (p = strstr(p, "\r\n"));) {
		p += 2;
		if (strncasecmp(p, name, n) == 0 && p[n] == ':') {
			const char *v = p + n + 1, *end;
			while (*v == ' ')
				v++;
			end = strstr(v, "\r\n");
			snprintf(out, len, "%.*s", (int)(end ? (size_t)(end - v) : strlen(v)), v);
			return true;
		}
	}
	return false;
}

struct response post(const struct service *svc, const char *path, const char *body,
		     const char *const *extra)
{
	const char *headers[16] = { "Authorization: Bearer " TOKEN_WRITE,
				    "Content-Type: application/json" };
	size_t n = 2;

	for (size_t i = 0; extra && extra[i] && n < 15; i++)
		headers[n++] = extra[i];
	headers[n] = NULL;
	return http_request(svc->port, "POST", path, headers, body, 30);
}

void harness_post_created(const struct service *svc, const char *path, const char *body)
{
	harness_post_created_at(svc, path, body, NULL, 0);
}

void harness_post_created_at(const struct service *svc, const char *path, const char *body,
			     char *pos, size_t len)
{
	struct response r = post(svc, path, body, NULL);

	cr_assert_eq(r.status, 201, "%s %s: %d %s", path, body, r.status, r.body);
	if (pos) {
		const char *at = json_string_value(json_object_get(r.json, "position"));
		cr_assert_not_null(at, "%s %s: no position in %s", path, body, r.body);
		snprintf(pos, len, "%s", at);
	}
	response_free(&r);
}
