/* daybook-admin rebuild: progress lines and messages (a bar on a terminal, else JSON lines). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "log.h"
#include "rebuild.h"

/* One JSON object as a line on stdout (stolen). */
void rb_json_line(json_t *obj)
{
	char *text = obj ? json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;

	if (text) {
		puts(text);
		fflush(stdout);
	}
	free(text);
	json_decref(obj);
}

/* A message: on a terminal "daybook-admin rebuild: ..." on stderr, otherwise a JSON
 * line {"phase":"error","error":"..."} (or "note") on stdout; one line either way. */
static void rb_say(struct rebuild *rb, bool error, const char *fmt, va_list ap)
{
	char msg[2048], line[2048];
	const char *kind = error ? "error" : "note";

	vsnprintf(msg, sizeof(msg), fmt, ap);
	log_oneline(msg, line, sizeof(line));
	if (error && !rb->error[0])
		snprintf(rb->error, sizeof(rb->error), "%s", line);
	if (rb->tty)
		log_msg(&rb->ctx->log, error ? LOG_ERROR : LOG_WARN, NULL, "%s", line);
	else
		rb_json_line(json_pack("{s:s, s:o}", "phase", kind, kind, log_text(line)));
}

/* An error; the first is kept for the final line. */
__attribute__((format(printf, 2, 3))) void rb_error(struct rebuild *rb, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	rb_say(rb, true, fmt, ap);
	va_end(ap);
}

/* Something the operator should know that does not stop the rebuild. */
__attribute__((format(printf, 2, 3))) void rb_note(struct rebuild *rb, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	rb_say(rb, false, fmt, ap);
	va_end(ap);
}

double rb_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void rb_report(struct rebuild *rb, bool final)
{
	double t = rb_now(), rate = rb->done / (t - rb->started + 1e-9);
	double eta = rate > 0 && rb->total > rb->done ? (double)(rb->total - rb->done) / rate : 0;

	if (!final && t - rb->last_report < (rb->tty ? 0.1 : 1.0))
		return;
	rb->last_report = t;
	if (rb->tty) {
		int width = 30,
		    fill = rb->total ? (int)(width * (double)rb->done / (double)rb->total) : width;
		fprintf(stderr, "\r%-9s [%.*s%*s] %lld/%lld events  %.0f ev/s  ETA %.0fs ",
			rb->phase, fill > width ? width : fill, "##############################",
			width - (fill > width ? width : fill), "", rb->done, rb->total, rate, eta);
		if (final)
			fputc('\n', stderr);
	} else {
		printf("{\"phase\":\"%s\",\"done\":%lld,\"total\":%lld,\"events_per_s\":%.0f,"
		       "\"eta_s\":%.1f}\n",
		       rb->phase, rb->done, rb->total, rate, eta);
		fflush(stdout);
	}
}
