"""One home for the kernel: every /proc reader, netlink query, system call and BPF encoding.

Each module is one kind of kernel access; nothing here imports the supervisor, the steering
or the interposer (they import from here):

- ``syscalls``: system call numbers per architecture, ``syscall()``, prctl (parent-death
  signal, no_new_privs, child subreaper), pidfds (``pidfd_open``, ``pidfd_getfd``,
  ``pidfd_send_signal``).
- ``proc``: /proc/PID readers (stat parsed once, the process tree, fd tables, status).
- ``sockdiag``: socket tables (sock_diag netlink, /proc/net fallback): port holders,
  connections and listeners of processes.
- ``tcpinfo``: a listener's accept-queue depth (TCP_INFO), socket inodes.
- ``waiting``: "is this process (tree) waiting for work on these sockets" (readiness).
- ``bpf``: the classic BPF encoder (seccomp filters, socket filters, reuseport programs).
- ``sysctl``: the sysctls portshard reads or sets.
- ``exec``: fork and exec with an error pipe and collision-free fd placement.
- ``cgroup``: a cgroup2 group per worker (kill, freeze, members), or the subreaper fallback.
"""
