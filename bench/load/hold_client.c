/* Opens N idle TCP connections to HOST:PORT and holds them (issue 17's supervisor-CPU row).
 *
 *   hold_client HOST PORT N
 *
 * Source addresses rotate over 127.0.0.1-127.0.0.254 so that N may exceed one address's
 * ephemeral ports. Prints "held N" once every connection is established (the server need not
 * accept them at once: a connection counts once connect() completes), then holds them until
 * stdin closes, then closes them all and exits. The caller raises RLIMIT_NOFILE first.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: hold_client HOST PORT N\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) {
        fprintf(stderr, "hold_client: bad host %s\n", argv[1]);
        return 2;
    }
    long n = strtol(argv[3], NULL, 10);
    int *fds = calloc((size_t)n + 1, sizeof(int));
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            fprintf(stderr, "hold_client: socket #%ld: %s\n", i, strerror(errno));
            return 1;
        }
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7F000001u + (uint32_t)(i % 254));
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0 ||
            connect(fd, (struct sockaddr *)&dst, sizeof dst) != 0) {
            fprintf(stderr, "hold_client: connection #%ld: %s\n", i, strerror(errno));
            return 1;
        }
        fds[i] = fd;
    }
    printf("held %ld\n", n);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    for (long i = 0; i < n; i++) close(fds[i]);
    return 0;
}
