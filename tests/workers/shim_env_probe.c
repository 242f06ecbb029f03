/*
 * An ordinary program for the shim's environment fuzz (tests/unit/test_shim_fuzz.py), run under
 * LD_PRELOAD with generated PORTSHARD_SHIM* settings. fd 3 is a listening TCP socket with
 * SO_REUSEPORT (as a supervisor's). It binds a free port P (after SO_REUSEADDR, as servers do)
 * and then fd 3's port Q on a socket of its own, and prints one line:
 *   P=R Q=R
 * R: 0 (bound and listening), -ERRNO of bind, -1000-ERRNO of socket, -2000-ERRNO of listen.
 * Without the shim P binds and Q fails with EADDRINUSE; the shim may only change Q (adopt
 * fd 3, or set SO_REUSEPORT).
 * Usage: shim_env_probe FD SHIM: moves FD to 3, sets LD_PRELOAD=SHIM and runs itself again
 * (the shim reads fd 3 when it loads, before main).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int bind_listen(unsigned short port, int reuseaddr)
{
	struct sockaddr_in a;
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1000 - errno;
	if (reuseaddr)
		(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	errno = 0;
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
		return -errno;
	if (listen(fd, 8) != 0)
		return -2000 - errno;
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_in a;
	socklen_t len = sizeof(a);
	unsigned short p, q;
	int probe;

	if (argc == 3) {
		int fd = atoi(argv[1]);
		char *again[] = {argv[0], NULL};

		if (fd != 3 && (dup2(fd, 3) != 3 || close(fd) != 0))
			return 3;
		if (setenv("LD_PRELOAD", argv[2], 1) != 0)
			return 3;
		execv("/proc/self/exe", again);
		return 3;
	}

	if (getsockname(3, (struct sockaddr *)&a, &len) != 0)
		return 2;
	q = ntohs(a.sin_port);
	/* a free port, found with the raw system call (the shim sees nothing of it) */
	probe = socket(AF_INET, SOCK_STREAM, 0);
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	len = sizeof(a);
	if (probe < 0 || syscall(SYS_bind, probe, &a, sizeof(a)) != 0 ||
	    getsockname(probe, (struct sockaddr *)&a, &len) != 0)
		return 2;
	p = ntohs(a.sin_port);
	close(probe);
	printf("P=%d Q=%d\n", bind_listen(p, 1), bind_listen(q, 0));
	return 0;
}
