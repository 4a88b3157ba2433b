/* The metrics every process exposes, read when /metrics is scraped: daybook_build_info
 * and the process_* family of the Prometheus client libraries, from /proc/self. */
#include "metrics.h"

#include <dirent.h>
#include <event2/buffer.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "daybook_commit.h"  /* generated at build time: DAYBOOK_GIT_COMMIT */
#include "daybook_version.h" /* generated at build time: DAYBOOK_VERSION */

/* utime, stime and starttime of /proc/self/stat, in clock ticks; false when unreadable. */
static bool read_stat(unsigned long long *utime, unsigned long long *stime,
		      unsigned long long *start)
{
	/* Bounded: the command name in it is at most 16 bytes, the rest are numbers. */
	char buf[1024];
	size_t n;
	const char *p;
	FILE *f = fopen("/proc/self/stat", "r"); /* this process's CPU times and start */

	if (!f)
		return false;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
	/* After ")": state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
	 * cmajflt utime(14) stime(15) cutime cstime priority nice num_threads itrealvalue
	 * starttime(22). */
	return p && sscanf(p + 1,
			   " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d "
			   "%*d %*d %*d %*d %llu",
			   utime, stime, start) == 3;
}

/* The boot time in seconds since the epoch (btime of /proc/stat); 0 when unknown. */
static unsigned long long boot_time(void)
{
	char *line = NULL;
	size_t cap = 0;
	unsigned long long btime = 0;
	FILE *f = fopen("/proc/stat", "r"); /* the system's boot time */

	if (!f)
		return 0;
	while (getline(&line, &cap, f) > 0)
		if (sscanf(line, "btime %llu", &btime) == 1)
			break;
	free(line);
	fclose(f);
	return btime;
}

/* Resident and virtual size in bytes from /proc/self/statm; false when unreadable. */
static bool read_statm(double *rss, double *vsize)
{
	unsigned long long pages, resident;
	long page = sysconf(_SC_PAGESIZE);
	FILE *f = fopen("/proc/self/statm", "r"); /* this process's memory, in pages */
	bool ok;

	if (!f)
		return false;
	ok = fscanf(f, "%llu %llu", &pages, &resident) == 2 && page > 0;
	fclose(f);
	if (ok) {
		*rss = (double)resident * (double)page;
		*vsize = (double)pages * (double)page;
	}
	return ok;
}

/* Open file descriptors, the directory's own one not counted; -1 when unknown. */
static long open_fds(void)
{
	long n = 0;
	struct dirent *e;
	DIR *d = opendir("/proc/self/fd"); /* one entry per open descriptor */

	if (!d)
		return -1;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n > 0 ? n - 1 : 0;
}

static void family(struct evbuffer *out, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_render_process(struct evbuffer *out)
{
	unsigned long long utime, stime, start;
	long ticks = sysconf(_SC_CLK_TCK);
	double rss, vsize;
	long fds = open_fds();
	struct rlimit lim;

	family(out, "daybook_build_info", "gauge",
	       "Always 1; the labels say which version and commit this process runs.");
	evbuffer_add_printf(out, "daybook_build_info{version=\"%s\",commit=\"%s\"} 1\n",
			    DAYBOOK_VERSION,
			    DAYBOOK_GIT_COMMIT[0] ? DAYBOOK_GIT_COMMIT : "unknown");
	if (ticks > 0 && read_stat(&utime, &stime, &start)) {
		family(out, "process_cpu_seconds_total", "counter",
		       "User and system CPU time spent, in seconds.");
		evbuffer_add_printf(out, "process_cpu_seconds_total %.17g\n",
				    (double)(utime + stime) / (double)ticks);
		unsigned long long btime = boot_time();
		if (btime) {
			family(out, "process_start_time_seconds", "gauge",
			       "Start time of the process since the Unix epoch, in seconds.");
			evbuffer_add_printf(out, "process_start_time_seconds %.17g\n",
					    (double)btime + (double)start / (double)ticks);
		}
	}
	if (read_statm(&rss, &vsize)) {
		family(out, "process_resident_memory_bytes", "gauge",
		       "Resident memory size in bytes.");
		evbuffer_add_printf(out, "process_resident_memory_bytes %.17g\n", rss);
		family(out, "process_virtual_memory_bytes", "gauge",
		       "Virtual memory size in bytes.");
		evbuffer_add_printf(out, "process_virtual_memory_bytes %.17g\n", vsize);
	}
	if (fds >= 0) {
		family(out, "process_open_fds", "gauge", "Number of open file descriptors.");
		evbuffer_add_printf(out, "process_open_fds %ld\n", fds);
	}
	if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
		family(out, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
		evbuffer_add_printf(out, "process_max_fds %llu\n",
				    (unsigned long long)lim.rlim_cur);
	}
}
