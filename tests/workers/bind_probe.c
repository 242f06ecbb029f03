/*
 * Binds ADDRESS:PORT the way an ordinary server does and reports, on one line, what it got:
 * bind/listen results and errno afterwards (set to EDOM before each call, so "errno=33"
 * means it was preserved), whether its fd is now the same socket as fd 3 (the supervisor's),
 * its flags and a few options. With PROBE_SHUTDOWN set, shutdown() on it. Then it serves connections (poll + accept)
 * until killed, so a supervisor sees it as ready.
 * Usage: bind_probe ADDRESS PORT   (ADDRESS: 0.0.0.0, ::, 127.0.0.2, ...)
 * Linked dynamically (the shim) or statically (seccomp) by the tests.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int option(int fd, int level, int name)
{
	int value = -1;
	socklen_t len = sizeof(value);

	if (getsockopt(fd, level, name, &value, &len) != 0)
		return -1;
	return value;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	struct stat mine, three;
	int family, fd, one = 1, defer = 5, rcvbuf = 65536, rc_bind, e_bind, rc_listen, e_listen;
	int rc_shut, e_shut;

	if (argc != 3) {
		fprintf(stderr, "usage: %s ADDRESS PORT\n", argv[0]);
		return 2;
	}
	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, argv[1], &((struct sockaddr_in *)&ss)->sin_addr) == 1) {
		family = AF_INET;
		((struct sockaddr_in *)&ss)->sin_port = htons((unsigned short)atoi(argv[2]));
		len = sizeof(struct sockaddr_in);
	} else {
		family = AF_INET6;
		if (inet_pton(AF_INET6, argv[1], &((struct sockaddr_in6 *)&ss)->sin6_addr) != 1)
			return 2;
		((struct sockaddr_in6 *)&ss)->sin6_port = htons((unsigned short)atoi(argv[2]));
		len = sizeof(struct sockaddr_in6);
	}
	ss.ss_family = (sa_family_t)family;
	fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof(defer));
	errno = EDOM;
	rc_bind = bind(fd, (struct sockaddr *)&ss, len);
	e_bind = errno;
	errno = EDOM;
	rc_listen = listen(fd, 5);
	e_listen = errno;
	errno = EDOM;
	rc_shut = getenv("PROBE_SHUTDOWN") ? shutdown(fd, SHUT_RDWR) : -2;
	e_shut = errno;
	fstat(fd, &mine);
	printf("probe bind=%d bind_errno=%d listen=%d listen_errno=%d shutdown=%d shutdown_errno=%d "
	       "same=%d "
	       "nonblock=%d cloexec=%d keepalive=%d defer=%d rcvbuf=%d listening=%d\n",
	       rc_bind, e_bind, rc_listen, e_listen, rc_shut, e_shut,
	       fstat(3, &three) == 0 && three.st_ino == mine.st_ino,
	       (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0, (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0,
	       option(fd, SOL_SOCKET, SO_KEEPALIVE), option(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT),
	       option(fd, SOL_SOCKET, SO_RCVBUF), option(fd, SOL_SOCKET, SO_ACCEPTCONN));
	fflush(stdout);
	if (rc_bind != 0 || rc_listen != 0)
		return 1;
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};

		if (poll(&p, 1, -1) > 0) {
			int c = accept(fd, NULL, NULL);

			if (c >= 0)
				close(c);
		}
	}
}
