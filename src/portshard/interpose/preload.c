/*
 * portshard LD_PRELOAD shim: give an unmodified, dynamically linked program the supervisor's
 * socket when it binds a managed address, or (reuseport mode) only set SO_REUSEPORT.
 *
 * Environment (read once, validated; anything invalid disables the shim with one line on
 * stderr, so the program runs untouched; the line shows at most 64 bytes of the value, control
 * characters as '?'; tests/unit/test_shim_fuzz.py fuzzes all of it):
 *
 *   PORTSHARD_SHIM        "inherit" or "reuseport"; unset or empty: do nothing
 *   PORTSHARD_SHIM_FDS    inherit: FD:INODE,... the sockets the supervisor passed (fds 3...).
 *                         The inode makes a descendant whose fd 3 is something else ignore it.
 *   PORTSHARD_SHIM_PORTS  reuseport: PORT,... (1-65535); unset or empty: every port
 *   PORTSHARD_SHIM_DEBUG  "1": one line on stderr per decision
 *
 * Inherit mode. bind(fd, A) where A matches a passed socket S (same type and protocol; same
 * family and address and port, or A is the wildcard 0.0.0.0 / :: of either family on S's port,
 * or A is one address (127.0.0.1) and S the wildcard that receives it: the program then serves
 * what --listen says, and one line on stderr says so): copy the options the program set on fd
 * that matter to S, give S the program's O_NONBLOCK, dup3() S over fd (keeping fd's
 * close-on-exec flag) and return 0. listen() on S returns 0 (the supervisor's backlog stays),
 * shutdown() on S returns 0 (a shutdown() would kill the socket for every holder). Anything
 * else goes to the real call, untouched; a bind() on a managed port that does not match says
 * why on stderr (both addresses and the fix), and a TCP listen() on a port nobody manages says
 * so once per port (the program's server is then somewhere portshard does not serve).
 * Keep the matching rules in step with seccomp.py match().
 *
 * Reuseport mode (libreuseport-compatible): set SO_REUSEPORT before bind() to a listed port,
 * and when the program sets SO_REUSEADDR on a socket already bound to a listed port (or on any
 * socket when no list is given, as libreuseport does).
 *
 * errno is preserved on every path that does not fail; only bind, listen, setsockopt and
 * shutdown are exported (built with -fvisibility=hidden).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PORTSHARD_EXPORT __attribute__((visibility("default")))

#if defined(__GLIBC__) && defined(__USE_GNU) && !defined(__cplusplus)
#define PORTSHARD_SOCKADDR(arg) ((arg).__sockaddr__)
#else
#define PORTSHARD_SOCKADDR(arg) (arg)
#endif

enum {
	PORTSHARD_MAX_FDS = 64,
	PORTSHARD_MAX_PORTS = 256,
	PORTSHARD_MODE_OFF = 0,
	PORTSHARD_MODE_INHERIT = 1,
	PORTSHARD_MODE_REUSEPORT = 2,
};

struct portshard_socket {
	int fd;
	dev_t dev;
	ino_t ino;
	int family;
	int type;
	int protocol;
	int dualstack; /* an IPv6 wildcard that also receives IPv4 (IPV6_V6ONLY off) */
	unsigned short port; /* host order */
	struct sockaddr_storage addr;
};

static struct {
	int mode;
	int debug;
	size_t nsockets;
	struct portshard_socket sockets[PORTSHARD_MAX_FDS];
	size_t nports; /* 0: every port (reuseport mode) */
	unsigned short ports[PORTSHARD_MAX_PORTS];
} portshard_cfg;

/* fds the program bound to port 0 (the kernel picks a port: not a port anyone chose, so
 * listen() on it gets no note); fds >= 4096 are not tracked. */
static unsigned char portshard_ephemeral[4096 / 8];

static void portshard_set_ephemeral(int fd, int on)
{
	if (fd < 0 || fd >= 4096)
		return;
	if (on)
		__atomic_fetch_or(&portshard_ephemeral[fd / 8], (unsigned char)(1u << (fd % 8)),
				  __ATOMIC_RELAXED);
	else
		__atomic_fetch_and(&portshard_ephemeral[fd / 8], (unsigned char)~(1u << (fd % 8)),
				   __ATOMIC_RELAXED);
}

static int portshard_is_ephemeral(int fd)
{
	return fd >= 0 && fd < 4096 &&
	       (__atomic_load_n(&portshard_ephemeral[fd / 8], __ATOMIC_RELAXED) >> (fd % 8)) & 1;
}

/* Unmanaged ports already reported by listen() (inherit mode), so each is said once. */
static struct {
	pthread_mutex_t lock;
	size_t n;
	unsigned short ports[16];
} portshard_noted = {PTHREAD_MUTEX_INITIALIZER, 0, {0}};

typedef int (*portshard_bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*portshard_listen_fn)(int, int);
typedef int (*portshard_setsockopt_fn)(int, int, int, const void *, socklen_t);
typedef int (*portshard_shutdown_fn)(int, int);

static portshard_bind_fn portshard_real_bind;
static portshard_listen_fn portshard_real_listen;
static portshard_setsockopt_fn portshard_real_setsockopt;
static portshard_shutdown_fn portshard_real_shutdown;
static pthread_once_t portshard_once = PTHREAD_ONCE_INIT;

static void portshard_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void portshard_say(const char *fmt, ...)
{
	char line[512];
	int saved = errno;
	va_list ap;
	int n = snprintf(line, sizeof(line), "portshard-shim[%ld]: ", (long)getpid());

	if (n < 0 || (size_t)n >= sizeof(line))
		n = 0;
	va_start(ap, fmt);
	(void)vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = (int)strlen(line);
	for (int i = 0; i < n; i++) /* one line, whatever the environment held */
		if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
			line[i] = '?';
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, (size_t)n) < 0) {
		/* nothing to do: stderr is closed */
	}
	errno = saved;
}

/* When the next library has no such symbol (dlsym returns NULL), make the system call. */
static int portshard_sys_bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	return (int)syscall(SYS_bind, fd, addr, len);
}

static int portshard_sys_listen(int fd, int backlog)
{
	return (int)syscall(SYS_listen, fd, backlog);
}

static int portshard_sys_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	return (int)syscall(SYS_setsockopt, fd, level, name, val, len);
}

static int portshard_sys_shutdown(int fd, int how)
{
	return (int)syscall(SYS_shutdown, fd, how);
}

static void *portshard_next(const char *name)
{
	void *sym = dlsym(RTLD_NEXT, name);

	if (sym == NULL)
		portshard_say("dlsym(RTLD_NEXT, \"%s\") found nothing; using the system call", name);
	return sym;
}

/* A whole decimal number in [low, high], nothing else; -1 otherwise. */
static long long portshard_number(const char *text, size_t len, long long low, long long high)
{
	long long value = 0;
	size_t i;

	if (len == 0 || len > 20)
		return -1;
	for (i = 0; i < len; i++) {
		int digit = text[i] - '0';

		if (text[i] < '0' || text[i] > '9' || value > (high - digit) / 10)
			return -1; /* checked before it could overflow */
		value = value * 10 + digit;
	}
	return value < low ? -1 : value;
}

static unsigned short portshard_port_of(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)ss)->sin_port);
	return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

static int portshard_add_socket(int fd, unsigned long long ino)
{
	struct portshard_socket *s = &portshard_cfg.sockets[portshard_cfg.nsockets];
	struct stat st;
	socklen_t len;

	if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode) || (unsigned long long)st.st_ino != ino) {
		if (portshard_cfg.debug)
			portshard_say("fd %d is not the supervisor's socket (inode %llu) here; ignored",
				      fd, ino);
		return 0;
	}
	memset(s, 0, sizeof(*s));
	s->fd = fd;
	s->dev = st.st_dev;
	s->ino = st.st_ino;
	len = sizeof(s->addr);
	if (getsockname(fd, (struct sockaddr *)&s->addr, &len) != 0)
		return -1;
	len = sizeof(s->type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &s->type, &len) != 0)
		return -1;
	len = sizeof(s->protocol);
	if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &s->protocol, &len) != 0)
		return -1;
	s->family = s->addr.ss_family;
	if (s->family != AF_INET && s->family != AF_INET6)
		return 0; /* not ours to match (e.g. a Unix socket passed too) */
	if (s->family == AF_INET6) {
		int v6only = 1;

		len = sizeof(v6only);
		if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) != 0)
			return -1;
		s->dualstack = !v6only;
	}
	s->port = portshard_port_of(&s->addr);
	portshard_cfg.nsockets++;
	return 0;
}

static int portshard_parse_fds(const char *text)
{
	const char *p = text;

	while (*p) {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		const char *colon = memchr(p, ':', len);
		long long fd, ino;

		if (colon == NULL)
			return -1;
		fd = portshard_number(p, (size_t)(colon - p), 0, 1 << 20);
		ino = portshard_number(colon + 1, len - (size_t)(colon - p) - 1, 1, 1LL << 62);
		if (fd < 0 || ino < 0 || portshard_cfg.nsockets >= PORTSHARD_MAX_FDS)
			return -1;
		if (portshard_add_socket((int)fd, (unsigned long long)ino) != 0)
			return -1;
		p = end ? end + 1 : p + len;
	}
	return 0;
}

static int portshard_parse_ports(const char *text)
{
	const char *p = text;

	while (*p) {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		long long port = portshard_number(p, len, 1, 65535);

		if (port < 0 || portshard_cfg.nports >= PORTSHARD_MAX_PORTS)
			return -1;
		portshard_cfg.ports[portshard_cfg.nports++] = (unsigned short)port;
		p = end ? end + 1 : p + len;
	}
	return 0;
}

/* A setting in a warning: its first PORTSHARD_SHOWN bytes, then "..." (the reason and the
 * fix must fit in the line). */
enum { PORTSHARD_SHOWN = 64 };

static const char *portshard_more(const char *value)
{
	return value != NULL && strlen(value) > PORTSHARD_SHOWN ? "..." : "";
}

static void portshard_init(void)
{
	const char *mode = getenv("PORTSHARD_SHIM");
	const char *debug = getenv("PORTSHARD_SHIM_DEBUG");
	int saved = errno;

	portshard_real_bind = (portshard_bind_fn)portshard_next("bind");
	portshard_real_listen = (portshard_listen_fn)portshard_next("listen");
	portshard_real_setsockopt = (portshard_setsockopt_fn)portshard_next("setsockopt");
	portshard_real_shutdown = (portshard_shutdown_fn)portshard_next("shutdown");
	if (portshard_real_bind == NULL)
		portshard_real_bind = portshard_sys_bind;
	if (portshard_real_listen == NULL)
		portshard_real_listen = portshard_sys_listen;
	if (portshard_real_setsockopt == NULL)
		portshard_real_setsockopt = portshard_sys_setsockopt;
	if (portshard_real_shutdown == NULL)
		portshard_real_shutdown = portshard_sys_shutdown;

	portshard_cfg.debug = debug != NULL && strcmp(debug, "1") == 0;
	if (mode == NULL || *mode == '\0') {
		portshard_cfg.mode = PORTSHARD_MODE_OFF;
	} else if (strcmp(mode, "inherit") == 0) {
		const char *fds = getenv("PORTSHARD_SHIM_FDS");

		portshard_cfg.mode = PORTSHARD_MODE_INHERIT;
		if (fds == NULL || portshard_parse_fds(fds) != 0) {
			portshard_say("PORTSHARD_SHIM_FDS=%.*s%s is not FD:INODE,...; the shim is off",
				      PORTSHARD_SHOWN, fds ? fds : "(unset)", portshard_more(fds));
			portshard_cfg.mode = PORTSHARD_MODE_OFF;
			portshard_cfg.nsockets = 0;
		}
	} else if (strcmp(mode, "reuseport") == 0) {
		const char *ports = getenv("PORTSHARD_SHIM_PORTS");

		portshard_cfg.mode = PORTSHARD_MODE_REUSEPORT;
		if (ports != NULL && portshard_parse_ports(ports) != 0) {
			portshard_say("PORTSHARD_SHIM_PORTS=%.*s%s is not PORT,... (1-65535); the shim "
				      "is off",
				      PORTSHARD_SHOWN, ports, portshard_more(ports));
			portshard_cfg.mode = PORTSHARD_MODE_OFF;
		}
	} else {
		portshard_say("PORTSHARD_SHIM=%.*s%s: use inherit or reuseport; the shim is off",
			      PORTSHARD_SHOWN, mode, portshard_more(mode));
	}
	errno = saved;
}

static void portshard_ensure_init(void)
{
	(void)pthread_once(&portshard_once, portshard_init);
}

__attribute__((constructor)) static void portshard_constructor(void)
{
	portshard_ensure_init();
}

static int portshard_port_listed(unsigned short port)
{
	size_t i;

	if (portshard_cfg.nports == 0)
		return 1;
	for (i = 0; i < portshard_cfg.nports; i++)
		if (portshard_cfg.ports[i] == port)
			return 1;
	return 0;
}

static int portshard_is_wildcard(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ((const struct sockaddr_in *)ss)->sin_addr.s_addr == htonl(INADDR_ANY);
	return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)ss)->sin6_addr);
}

static int portshard_same_address(const struct sockaddr_storage *a,
				  const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET)
		return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
		       ((const struct sockaddr_in *)b)->sin_addr.s_addr;
	return IN6_ARE_ADDR_EQUAL(&((const struct sockaddr_in6 *)a)->sin6_addr,
				  &((const struct sockaddr_in6 *)b)->sin6_addr);
}

/*
 * The passed socket a bind() of `want` on a socket of this type/protocol should get, in order:
 * the same family and address; for a wildcard, the supervisor's --listen decides which (the
 * same family first); for one address, a wildcard socket that receives it (the program then
 * serves every interface, as --listen says, instead of failing with EADDRINUSE).
 */
static const struct portshard_socket *portshard_match(const struct sockaddr_storage *want,
						      int type, int protocol)
{
	const struct portshard_socket *other_family = NULL, *covering = NULL;
	unsigned short port = portshard_port_of(want);
	int wildcard = portshard_is_wildcard(want);
	size_t i;

	for (i = 0; i < portshard_cfg.nsockets; i++) {
		const struct portshard_socket *s = &portshard_cfg.sockets[i];

		if (s->port != port || s->type != type || s->protocol != protocol)
			continue;
		if (portshard_same_address(&s->addr, want))
			return s;
		if (wildcard) {
			if (s->family == want->ss_family)
				return s;
			if (other_family == NULL)
				other_family = s;
		} else if (portshard_is_wildcard(&s->addr) &&
			   (s->family == want->ss_family || s->dualstack) &&
			   (covering == NULL || covering->family != want->ss_family)) {
			covering = s;
		}
	}
	return other_family ? other_family : covering;
}

/* "127.0.0.1:8000" or "[::1]:8000" into buf. */
static const char *portshard_show(const struct sockaddr_storage *ss, char *buf, size_t size)
{
	char host[INET6_ADDRSTRLEN];
	const void *raw = ss->ss_family == AF_INET
				  ? (const void *)&((const struct sockaddr_in *)ss)->sin_addr
				  : (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr;

	if (inet_ntop(ss->ss_family, raw, host, sizeof(host)) == NULL)
		(void)snprintf(host, sizeof(host), "?");
	(void)snprintf(buf, size, ss->ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", host,
		       portshard_port_of(ss));
	return buf;
}

/* A bind() on a managed port that got no slot socket: say which address portshard serves. */
static void portshard_say_mismatch(int fd, const struct sockaddr_storage *want, int type,
				   int protocol)
{
	char asked[64], ours[64];
	unsigned short port = portshard_port_of(want);
	const struct portshard_socket *any = NULL;
	size_t i;

	for (i = 0; i < portshard_cfg.nsockets; i++) {
		const struct portshard_socket *s = &portshard_cfg.sockets[i];

		if (s->port != port)
			continue;
		if (any == NULL)
			any = s;
		if (s->type == type && s->protocol == protocol) {
			portshard_show(want, asked, sizeof(asked));
			portshard_show(&s->addr, ours, sizeof(ours));
			portshard_say("bind(fd %d) to %s does not match portshard's socket on %s; the "
				      "program binds a socket of its own, which portshard does not "
				      "manage (or fails with EADDRINUSE). Make it bind %s (or every "
				      "interface), or use --listen %s://%s",
				      fd, asked, ours, ours, type == SOCK_DGRAM ? "udp" : "tcp", asked);
			return;
		}
	}
	if (any != NULL)
		portshard_say("bind(fd %d) to port %u: not the protocol portshard serves there (type "
			      "%d, protocol %d); binding the program's own socket",
			      fd, port, type, protocol);
}

/* Whether a stream socket before sockets[i] has its port (to list each port once). */
static int portshard_seen_before(size_t i)
{
	size_t j;

	for (j = 0; j < i; j++)
		if (portshard_cfg.sockets[j].type == SOCK_STREAM &&
		    portshard_cfg.sockets[j].port == portshard_cfg.sockets[i].port)
			return 1;
	return 0;
}

/* listen() on a TCP socket bound to a port nobody manages: say so, once per port. */
static void portshard_note_unmanaged(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char ours[128];
	size_t i, n = 0;
	unsigned short port;
	int type, known = 0;

	if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0 ||
	    (ss.ss_family != AF_INET && ss.ss_family != AF_INET6))
		return;
	len = sizeof(type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
		return;
	port = portshard_port_of(&ss);
	if (port == 0 || portshard_is_ephemeral(fd))
		return;
	ours[0] = '\0';
	for (i = 0; i < portshard_cfg.nsockets; i++) {
		const struct portshard_socket *s = &portshard_cfg.sockets[i];

		if (s->port == port)
			return; /* a managed port (a narrower bind said why already) */
		if (s->type == SOCK_STREAM && n + 8 < sizeof(ours) && !portshard_seen_before(i))
			n += (size_t)snprintf(ours + n, sizeof(ours) - n, "%s%u", n ? "," : "", s->port);
	}
	if (n == 0)
		return;
	(void)pthread_mutex_lock(&portshard_noted.lock);
	for (i = 0; i < portshard_noted.n; i++)
		known |= portshard_noted.ports[i] == port;
	if (portshard_noted.n >= sizeof(portshard_noted.ports) / sizeof(unsigned short))
		known = 1; /* said enough: stay quiet from here on */
	else if (!known)
		portshard_noted.ports[portshard_noted.n++] = port;
	(void)pthread_mutex_unlock(&portshard_noted.lock);
	if (!known)
		portshard_say("the program listens on port %u, which portshard does not manage (it "
			      "serves %s): connections to %s never reach it. If %u is the port to "
			      "serve, write {port} where the program takes its port, or use --listen "
			      "tcp://:%u",
			      port, ours, ours, port, port);
}

static const struct portshard_socket *portshard_managed_fd(int fd)
{
	struct stat st;
	size_t i;

	if (portshard_cfg.nsockets == 0 || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
		return NULL;
	for (i = 0; i < portshard_cfg.nsockets; i++)
		if (portshard_cfg.sockets[i].ino == st.st_ino && portshard_cfg.sockets[i].dev == st.st_dev)
			return &portshard_cfg.sockets[i];
	return NULL;
}

enum { PORTSHARD_INT, PORTSHARD_BUF, PORTSHARD_LINGER, PORTSHARD_NAME };

/* Options a program sets on a listening socket that change how it serves: copied to the
 * supervisor's socket when they differ. Keep in step with seccomp.py COPIED_OPTIONS. */
static const struct {
	int level;
	int name;
	int kind;
	int family; /* 0: any */
	int type;   /* 0: any */
	const char *label;
} portshard_options[] = {
	{SOL_SOCKET, SO_RCVBUF, PORTSHARD_BUF, 0, 0, "SO_RCVBUF"},
	{SOL_SOCKET, SO_SNDBUF, PORTSHARD_BUF, 0, 0, "SO_SNDBUF"},
	{SOL_SOCKET, SO_KEEPALIVE, PORTSHARD_INT, 0, 0, "SO_KEEPALIVE"},
	{SOL_SOCKET, SO_LINGER, PORTSHARD_LINGER, 0, 0, "SO_LINGER"},
	{SOL_SOCKET, SO_PRIORITY, PORTSHARD_INT, 0, 0, "SO_PRIORITY"},
	{SOL_SOCKET, SO_RCVLOWAT, PORTSHARD_INT, 0, 0, "SO_RCVLOWAT"},
	{SOL_SOCKET, SO_MARK, PORTSHARD_INT, 0, 0, "SO_MARK"},
	{SOL_SOCKET, SO_BROADCAST, PORTSHARD_INT, 0, SOCK_DGRAM, "SO_BROADCAST"},
	{SOL_SOCKET, SO_TIMESTAMP, PORTSHARD_INT, 0, SOCK_DGRAM, "SO_TIMESTAMP"},
	{IPPROTO_IP, IP_TOS, PORTSHARD_INT, AF_INET, 0, "IP_TOS"},
	{IPPROTO_IP, IP_PKTINFO, PORTSHARD_INT, AF_INET, SOCK_DGRAM, "IP_PKTINFO"},
	{IPPROTO_IP, IP_RECVTOS, PORTSHARD_INT, AF_INET, SOCK_DGRAM, "IP_RECVTOS"},
	{IPPROTO_IPV6, IPV6_TCLASS, PORTSHARD_INT, AF_INET6, 0, "IPV6_TCLASS"},
	{IPPROTO_IPV6, IPV6_RECVPKTINFO, PORTSHARD_INT, AF_INET6, SOCK_DGRAM, "IPV6_RECVPKTINFO"},
	{IPPROTO_TCP, TCP_NODELAY, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_NODELAY"},
	{IPPROTO_TCP, TCP_DEFER_ACCEPT, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_DEFER_ACCEPT"},
	{IPPROTO_TCP, TCP_FASTOPEN, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_FASTOPEN"},
	{IPPROTO_TCP, TCP_KEEPIDLE, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_KEEPIDLE"},
	{IPPROTO_TCP, TCP_KEEPINTVL, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_KEEPINTVL"},
	{IPPROTO_TCP, TCP_KEEPCNT, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_KEEPCNT"},
	{IPPROTO_TCP, TCP_USER_TIMEOUT, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_USER_TIMEOUT"},
	{IPPROTO_TCP, TCP_MAXSEG, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_MAXSEG"},
	{IPPROTO_TCP, TCP_NOTSENT_LOWAT, PORTSHARD_INT, 0, SOCK_STREAM, "TCP_NOTSENT_LOWAT"},
	{IPPROTO_TCP, TCP_CONGESTION, PORTSHARD_NAME, 0, SOCK_STREAM, "TCP_CONGESTION"},
};

static void portshard_copy_options(int from, int to, int family, int to_family, int type)
{
	size_t i;

	for (i = 0; i < sizeof(portshard_options) / sizeof(portshard_options[0]); i++) {
		unsigned char a[64], b[64];
		socklen_t alen = sizeof(a), blen = sizeof(b);
		int level = portshard_options[i].level, name = portshard_options[i].name;

		if (portshard_options[i].family && (portshard_options[i].family != family ||
						    to_family != family))
			continue;
		if (portshard_options[i].type && portshard_options[i].type != type)
			continue;
		memset(a, 0, sizeof(a));
		memset(b, 0, sizeof(b));
		if (getsockopt(from, level, name, a, &alen) != 0 ||
		    getsockopt(to, level, name, b, &blen) != 0)
			continue;
		if (alen == blen && memcmp(a, b, alen) == 0)
			continue;
		if (portshard_options[i].kind == PORTSHARD_BUF) {
			int value;

			memcpy(&value, a, sizeof(value));
			value /= 2; /* getsockopt reports twice what setsockopt was given */
			memcpy(a, &value, sizeof(value));
		} else if (portshard_options[i].kind == PORTSHARD_NAME) {
			alen = (socklen_t)strnlen((const char *)a, sizeof(a) - 1);
		}
		if (portshard_real_setsockopt(to, level, name, a, alen) != 0)
			portshard_say("could not copy %s to the supervisor's socket: %s",
				      portshard_options[i].label, strerror(errno));
		else if (portshard_cfg.debug)
			portshard_say("copied %s to the supervisor's socket", portshard_options[i].label);
	}
}

static int portshard_adopt(int fd, const struct portshard_socket *s, int family, int type)
{
	int fdflags = fcntl(fd, F_GETFD);
	int flags = fcntl(fd, F_GETFL);
	int ours = fcntl(s->fd, F_GETFL);
	struct stat st;

	if (fdflags < 0 || flags < 0 || ours < 0)
		return -1;
	if (fstat(s->fd, &st) != 0 || st.st_ino != s->ino || st.st_dev != s->dev) {
		portshard_say("fd %d no longer holds the supervisor's socket (the program closed it); "
			      "binding the program's own socket instead",
			      s->fd);
		return -1;
	}
	portshard_copy_options(fd, s->fd, family, s->family, type);
	if ((flags & O_NONBLOCK) != (ours & O_NONBLOCK) &&
	    fcntl(s->fd, F_SETFL, (ours & ~O_NONBLOCK) | (flags & O_NONBLOCK)) != 0)
		return -1;
	return dup3(s->fd, fd, (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0 ? -1 : 0;
}

PORTSHARD_EXPORT int bind(int fd, __CONST_SOCKADDR_ARG arg, socklen_t len)
{
	const struct sockaddr *addr = PORTSHARD_SOCKADDR(arg);
	struct sockaddr_storage want;
	const struct portshard_socket *s;
	int saved = errno;
	int type, protocol;
	socklen_t optlen;
	unsigned short port;

	portshard_ensure_init();
	if (portshard_cfg.mode == PORTSHARD_MODE_OFF || addr == NULL)
		goto real;
	if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		memset(&want, 0, sizeof(want));
		memcpy(&want, addr, sizeof(struct sockaddr_in));
	} else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		memset(&want, 0, sizeof(want));
		memcpy(&want, addr, sizeof(struct sockaddr_in6));
	} else {
		goto real;
	}
	port = portshard_port_of(&want);
	if (portshard_cfg.mode == PORTSHARD_MODE_REUSEPORT) {
		const int one = 1;

		if (portshard_port_listed(port) &&
		    portshard_real_setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
			portshard_say("SO_REUSEPORT on fd %d: %s", fd, strerror(errno));
		else if (portshard_cfg.debug && portshard_port_listed(port))
			portshard_say("SO_REUSEPORT set on fd %d before bind to port %u", fd, port);
		goto real;
	}
	portshard_set_ephemeral(fd, port == 0);
	if (port == 0)
		goto real;
	optlen = sizeof(type);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &optlen) != 0)
		goto real;
	optlen = sizeof(protocol);
	if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &optlen) != 0)
		goto real;
	s = portshard_match(&want, type, protocol);
	if (s == NULL) {
		portshard_say_mismatch(fd, &want, type, protocol);
		goto real;
	}
	if (portshard_managed_fd(fd) != NULL)
		goto real; /* binding the supervisor's socket itself: let the kernel say EINVAL */
	if (portshard_adopt(fd, s, want.ss_family, type) != 0)
		goto real;
	if (!portshard_is_wildcard(&want) && portshard_is_wildcard(&s->addr)) {
		char asked[64], ours[64];

		portshard_show(&want, asked, sizeof(asked));
		portshard_show(&s->addr, ours, sizeof(ours));
		portshard_say("bind(fd %d) asked for %s and gets portshard's socket on %s (every "
			      "interface, as --listen says), so it also serves other interfaces; to "
			      "serve %s only, use --listen tcp://%s",
			      fd, asked, ours, asked, asked);
	}
	if (portshard_cfg.debug)
		portshard_say("bind(fd %d, port %u): now the supervisor's socket (fd %d)", fd, port,
			      s->fd);
	errno = saved;
	return 0;
real:
	errno = saved;
	return portshard_real_bind(fd, addr, len);
}

PORTSHARD_EXPORT int listen(int fd, int backlog)
{
	int saved = errno;

	portshard_ensure_init();
	if (portshard_cfg.mode == PORTSHARD_MODE_INHERIT && portshard_managed_fd(fd) != NULL) {
		if (portshard_cfg.debug)
			portshard_say("listen(fd %d, %d): already listening (the supervisor's backlog "
				      "stays)",
				      fd, backlog);
		errno = saved;
		return 0;
	}
	if (portshard_cfg.mode == PORTSHARD_MODE_INHERIT)
		portshard_note_unmanaged(fd);
	errno = saved;
	return portshard_real_listen(fd, backlog);
}

PORTSHARD_EXPORT int shutdown(int fd, int how)
{
	int saved = errno;

	portshard_ensure_init();
	if (portshard_cfg.mode == PORTSHARD_MODE_INHERIT && portshard_managed_fd(fd) != NULL) {
		int listening = 0;
		socklen_t len = sizeof(listening);

		if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening) {
			if (portshard_cfg.debug)
				portshard_say("shutdown(fd %d): ignored, it would close the supervisor's "
					      "socket for every worker",
					      fd);
			errno = saved;
			return 0;
		}
	}
	errno = saved;
	return portshard_real_shutdown(fd, how);
}

PORTSHARD_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	int saved = errno;

	portshard_ensure_init();
	if (portshard_cfg.mode == PORTSHARD_MODE_REUSEPORT && level == SOL_SOCKET &&
	    name == SO_REUSEADDR && val != NULL && len >= sizeof(int) && *(const int *)val != 0) {
		struct sockaddr_storage ss;
		socklen_t sslen = sizeof(ss);
		int wanted = portshard_cfg.nports == 0;

		/* With a port list, only a socket already bound to a listed port; an unbound one
		 * gets SO_REUSEPORT from bind() if its port is listed. */
		if (!wanted && getsockname(fd, (struct sockaddr *)&ss, &sslen) == 0 &&
		    (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
			unsigned short port = portshard_port_of(&ss);

			wanted = port != 0 && portshard_port_listed(port);
		}
		if (wanted) {
			const int one = 1;

			if (portshard_real_setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
				portshard_say("SO_REUSEPORT on fd %d: %s", fd, strerror(errno));
			else if (portshard_cfg.debug)
				portshard_say("SO_REUSEPORT set on fd %d with SO_REUSEADDR", fd);
		}
	}
	errno = saved;
	return portshard_real_setsockopt(fd, level, name, val, len);
}
