/* daybook-admin verify: reporting, the bottom room: a difference found (DIFF lines)
 * and a failure that leaves the verification without a verdict. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "verify.h"

/* One line in the log (libpq's multi-line errors folded); the verification has no
 * verdict. */
__attribute__((format(printf, 2, 3))) void verify_fail(struct verify *v, const char *fmt, ...)
{
	char msg[2048], line[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_error(v->log, "%s", log_oneline(msg, line, sizeof(line)));
	v->failed = true;
}

void verify_diff(struct verify *v, const char *model, const char *entity, const char *field,
		 const char *expected, const char *found)
{
	if (++v->diffs <= DIFFS_PRINTED)
		printf("DIFF %s %s %s: expected %s, found %s\n", model, entity, field, expected,
		       found);
}

/* One field: NULL is SQL NULL (or a missing value) and prints as null. */
void verify_field(struct verify *v, const char *model, const char *entity, const char *name,
		  const char *expected, const char *found)
{
	if (expected && found ? strcmp(expected, found) == 0 : expected == found)
		return;
	verify_diff(v, model, entity, name, expected ? expected : "null", found ? found : "null");
}

void verify_field_int(struct verify *v, const char *model, const char *entity, const char *name,
		      long long expected, const char *found)
{
	char text[24];

	snprintf(text, sizeof(text), "%lld", expected);
	verify_field(v, model, entity, name, text, found);
}
