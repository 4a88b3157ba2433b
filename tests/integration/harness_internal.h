/* Integration-test harness: what its files share with one another and not with tests. */
#ifndef DAYBOOK_TEST_HARNESS_INTERNAL_H
#define DAYBOOK_TEST_HARNESS_INTERNAL_H

/* The value of environment variable `name`; the test fails when it is unset or empty.
 * Owned by the environment. (harness_proc.c) */
const char *harness_env(const char *name);
/* The directory for test files ($TMPDIR, removed by `scripts/dev test` afterwards, or
 * /tmp). (harness_proc.c) */
const char *harness_tmpdir(void);

#endif
