"""Pure parts of portshard.linux: /proc/PID/stat parsing, mountinfo escapes, the BPF encoder."""

from __future__ import annotations

import ctypes

import pytest

from portshard.linux import bpf, cgroup, proc, syscalls

STAT_TAIL = b" 1 1234 1234 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 1000 10\n"


def test_parse_stat_takes_the_fields_after_the_last_parenthesis() -> None:
    st = proc.parse_stat(b"42 (a) b (c) d) S" + STAT_TAIL)
    assert st is not None
    assert (st.state, st.ppid, st.pgrp, st.session) == ("S", 1, 1234, 1234)
    assert (st.utime, st.stime) == (7, 3)


@pytest.mark.parametrize("raw", [b"", b"42 (x", b"42 (x) S 1 2"])
def test_parse_stat_of_a_cut_text_is_none(raw: bytes) -> None:
    assert proc.parse_stat(raw) is None


def test_mountinfo_escapes_are_decoded() -> None:
    assert cgroup._unescape(r"/run/my\040dir\011x") == "/run/my dir\tx"


def test_classic_program_masks_negative_offsets_and_bounds_its_length() -> None:
    prog = bpf.ClassicProgram([(bpf.LD_W_ABS, 0, 0, bpf.SKF_AD_OFF + bpf.SKF_AD_RANDOM)])
    assert len(prog) == 1
    first = ctypes.cast(prog.fprog.filter, ctypes.POINTER(bpf.SockFilter))[0]
    assert first.k == (bpf.SKF_AD_OFF + bpf.SKF_AD_RANDOM) & 0xFFFFFFFF
    assert len(prog.as_option()) == ctypes.sizeof(bpf.SockFprog)
    with pytest.raises(ValueError, match="1 to 4096"):
        bpf.ClassicProgram([])
    with pytest.raises(ValueError, match="1 to 4096"):
        bpf.ClassicProgram([(bpf.RET_K, 0, 0, 0)] * 4097)


def test_one_syscall_table_per_arch() -> None:
    for arch in syscalls.ARCHES.values():
        assert arch.waits.on_fd and arch.waits.epoll and arch.waits.poll
        assert len({arch.nr_bind, arch.nr_seccomp, arch.nr_bpf}) == 3
