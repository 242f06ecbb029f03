"""Ways to give an unmodified program the supervisor's socket when it calls bind().

``seccomp_sys`` is the ctypes plumbing for seccomp user notification (``--via seccomp``).
"""
