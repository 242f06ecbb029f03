/* A closed-loop HTTP/1.0 load generator that records every request: one new connection per
 * request, C of them in flight, one thread, epoll. Used by steering_bench.py.
 *
 *   steering_load HOST PORT CONCURRENCY SECONDS OUTFILE
 *
 * Writes one 16-byte record per request to OUTFILE: start (ns since the run began, u64),
 * latency (µs from connect() to the server's EOF, u32), the first token of the body (the
 * worker's slot, i16; -1 if none) and a status (u8: 0 ok, 1 connect failed, 2 reset or empty,
 * 3 still waiting when the run ended: latency is then a lower bound). Raw timings, no
 * coordinated-omission correction: a request that waits is measured for as long as it waits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct record {
    uint64_t start_ns;
    uint32_t latency_us;
    int16_t slot;
    uint8_t status;
    uint8_t pad;
};

struct conn {
    int fd;
    uint64_t start;
    int sent;
    size_t got;
    char buf[512];
};

static const char request[] = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
static struct record *records;
static size_t nrecords, capacity;
static uint64_t t0;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void record(struct conn *c, uint8_t status, uint64_t end) {
    if (nrecords == capacity) {
        capacity = capacity ? capacity * 2 : 1 << 16;
        records = realloc(records, capacity * sizeof *records);
        if (!records) {
            perror("realloc");
            exit(1);
        }
    }
    struct record *r = &records[nrecords++];
    r->start_ns = c->start - t0;
    uint64_t us = (end - c->start) / 1000;
    r->latency_us = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    r->slot = -1;
    r->status = status;
    r->pad = 0;
    if (status == 0) {
        c->buf[c->got < sizeof c->buf ? c->got : sizeof c->buf - 1] = 0;
        char *body = strstr(c->buf, "\r\n\r\n");
        if (body && body[4] >= '0' && body[4] <= '9')
            r->slot = (int16_t)atoi(body + 4);
        else
            r->status = 2;
    }
}

static int start(int ep, struct conn *c, struct sockaddr_in *addr) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        perror("socket");
        return -1;
    }
    c->start = now_ns();
    c->sent = 0;
    c->got = 0;
    if (connect(c->fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
        record(c, 1, now_ns());
        close(c->fd);
        c->fd = -1;
        return 1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        perror("epoll_ctl");
        return -1;
    }
    return 0;
}

static void finish(struct conn *c, uint8_t status) {
    record(c, status, now_ns());
    close(c->fd);
    c->fd = -1;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONCURRENCY SECONDS OUTFILE\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", argv[1]);
        return 2;
    }
    int n = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (n < 1 || seconds <= 0) {
        fprintf(stderr, "concurrency and seconds must be > 0\n");
        return 2;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)n, sizeof *conns);
    struct epoll_event *events = calloc((size_t)n, sizeof *events);
    if (ep < 0 || !conns || !events) {
        perror("setup");
        return 1;
    }
    t0 = now_ns();
    printf("t0 %llu\n", (unsigned long long)t0); /* CLOCK_MONOTONIC: the bench's clock */
    fflush(stdout);
    uint64_t end = t0 + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < n; i++) {
        int rc;
        while ((rc = start(ep, &conns[i], &addr)) == 1) {
        }
        if (rc < 0)
            return 1;
    }
    while (now_ns() < end) {
        int ready = epoll_wait(ep, events, n, 10);
        if (ready < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < ready; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c->sent) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(c->fd, request, sizeof request - 1) != sizeof request - 1) {
                    finish(c, 1);
                } else {
                    c->sent = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    continue;
                }
            } else {
                char tmp[4096];
                ssize_t got = read(c->fd, tmp, sizeof tmp);
                if (got > 0) {
                    size_t room = sizeof c->buf - 1 - c->got;
                    size_t take = (size_t)got < room ? (size_t)got : room;
                    memcpy(c->buf + c->got, tmp, take);
                    c->got += take;
                    continue;
                }
                if (got < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                finish(c, got == 0 && c->got ? 0 : 2);
            }
            if (now_ns() < end) {
                int rc;
                while ((rc = start(ep, c, &addr)) == 1 && now_ns() < end) {
                }
                if (rc < 0)
                    return 1;
            }
        }
    }
    uint64_t stop = now_ns();
    for (int i = 0; i < n; i++) {
        if (conns[i].fd >= 0) {
            record(&conns[i], 3, stop);
            close(conns[i].fd);
        }
    }
    FILE *out = fopen(argv[5], "wb");
    if (!out || fwrite(records, sizeof *records, nrecords, out) != nrecords || fclose(out)) {
        perror(argv[5]);
        return 1;
    }
    return 0;
}
