/* The monotonic clock in seconds: what every deadline, pause and duration is measured
 * with (never the wall clock, which may step). */
#ifndef DAYBOOK_SHARED_CLOCK_H
#define DAYBOOK_SHARED_CLOCK_H

#include <time.h>

static inline double mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
