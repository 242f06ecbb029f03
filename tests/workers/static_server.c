/*
 * A tiny HTTP/1.0 server, linked statically by the tests (gcc -static) so that no LD_PRELOAD
 * shim can reach it: only `--via seccomp` can hand it the supervisor's socket.
 * Usage: static_server PORT. Binds 0.0.0.0:PORT itself, answers "Hello from PID N" to each
 * request, one connection at a time.
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_in addr;
	char request[4096], reply[128];
	int one = 1, fd;
	long port;
	char *end;

	if (argc != 2 || (port = strtol(argv[1], &end, 10)) < 1 || port > 65535 || *end) {
		fprintf(stderr, "usage: %s PORT\n", argv[0]);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
		perror("socket");
		return 1;
	}
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)port);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, 128) != 0) {
		perror("bind/listen");
		return 1;
	}
	for (;;) {
		size_t got = 0;
		int conn = accept(fd, NULL, NULL);
		int len;

		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("accept");
			return 1;
		}
		while (got < sizeof(request) - 1) {
			ssize_t n = read(conn, request + got, sizeof(request) - 1 - got);

			if (n <= 0)
				break;
			got += (size_t)n;
			request[got] = '\0';
			if (strstr(request, "\r\n\r\n"))
				break;
		}
		len = snprintf(reply, sizeof(reply),
			       "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nHello from PID %ld\n",
			       (long)getpid());
		if (write(conn, reply, (size_t)len) < 0) {
			/* the client went away */
		}
		close(conn);
	}
}
