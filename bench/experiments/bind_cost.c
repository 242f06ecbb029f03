/*
 * Times N bind() calls, each on a fresh TCP socket: bind_cost ADDRESS PORT N.
 * Prints "bind_ns median=... p10=... p90=... failed=..." (per call, CLOCK_MONOTONIC).
 * Built and driven by bind_cost.py, under no interposition, the shim, or the seccomp trap.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr;
	long *ns;
	int n, i, failed = 0;

	if (argc != 4 || (n = atoi(argv[3])) < 1)
		return 2;
	ns = calloc((size_t)n, sizeof(*ns));
	if (ns == NULL)
		return 1;
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)atoi(argv[2]));
	inet_pton(AF_INET, argv[1], &addr.sin_addr);
	for (i = 0; i < n; i++) {
		struct timespec t0, t1;
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		clock_gettime(CLOCK_MONOTONIC, &t0);
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
			failed++;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		ns[i] = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
		close(fd);
	}
	qsort(ns, (size_t)n, sizeof(*ns), cmp);
	printf("bind_ns median=%ld p10=%ld p90=%ld failed=%d\n", ns[n / 2], ns[n / 10],
	       ns[n * 9 / 10], failed);
	return 0;
}
