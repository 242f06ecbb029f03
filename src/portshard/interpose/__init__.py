"""Ways to give an unmodified program the supervisor's socket when it calls bind() (``--via``).

``preload.c`` is the LD_PRELOAD shim (``shim`` finds it and builds its environment),
``seccomp`` answers trapped bind() calls from the supervisor's loop over the ctypes plumbing in
``seccomp_sys``, ``elf`` tells which of the two a program needs, and ``plan`` decides per spawn.
See docs/ARCHITECTURE.md, "Interposition".
"""
