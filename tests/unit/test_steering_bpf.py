"""eBPF pieces without loading anything: the assembler's jumps, the tuple key, and how often
held connections are walked one by one."""

from __future__ import annotations

import struct

import pytest

from portshard.steering import bpfasm as asm
from portshard.steering.bpfasm import Asm
from portshard.steering.held import LONGEST, HeldWalk
from portshard.steering.inflight import sock_ops_code, tuple_key
from portshard.steering.programs import tcp_code


def decode(code: bytes) -> list[tuple[int, int, int]]:
    return [(c, off, imm) for c, _regs, off, imm in struct.iter_unpack("=BBhi", code)]


def test_jumps_land_on_their_labels_forward_and_back_and_over_a_wide_load() -> None:
    a = Asm().label("top").op(asm.MOV64_IMM, dst=0, imm=1)
    a.jump(asm.JEQ_IMM, "end", dst=0, imm=1).map_fd(1, 7).jump(asm.JA, "top")
    a.label("end").op(asm.EXIT)
    insns = decode(a.code())
    assert len(insns) == 6  # the map load takes two slots
    assert insns[1][:2] == (asm.JEQ_IMM, 3)  # over the map load and the ja, to exit
    assert insns[4][:2] == (asm.JA, -5)  # back to the first instruction


def test_a_jump_to_a_label_never_placed_or_placed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="never placed"):
        Asm().jump(asm.JA, "nowhere").code()
    with pytest.raises(ValueError, match="placed twice"):
        Asm().label("x").label("x")


def test_the_programs_assemble_and_end_with_exit() -> None:
    for code in (tcp_code(3, 4, 5, (6, 7, 8, 9), 1024), sock_ops_code(3, 4, 5)):
        assert len(code) % 8 == 0 and decode(code)[-1][0] == asm.EXIT


def test_the_tuple_key_is_the_tcp_header_ports_then_the_client_as_ipv6() -> None:
    key = tuple_key("10.1.2.3", 40000, 8080)
    assert len(key) == 20
    assert key[:4] == struct.pack("!HH", 40000, 8080)
    assert key[4:] == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert tuple_key("::1", 1, 2)[4:] == bytes(15) + b"\x01"


def test_held_connections_are_walked_less_often_as_the_walk_grows() -> None:
    walk = HeldWalk()
    assert walk.due(0.0)
    walk.done(0.0, {1: 300, 2: 400}, took=0.001)
    assert walk.due(1.0) and not walk.due(0.5)  # a cheap walk: every second
    walk.done(10.0, {1: 10_000}, took=0.05)  # 50 ms: next in 10 s (0.5% of a core)
    assert not walk.due(19.0) and walk.due(20.0)
    walk.done(100.0, {1: 100_000}, took=2.0)
    assert walk.due(100.0 + LONGEST) and not walk.due(100.0 + LONGEST - 1)
