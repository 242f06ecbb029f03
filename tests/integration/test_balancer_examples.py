"""examples/haproxy and examples/nftables are valid for the real programs (issue 16)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

from .conftest import need


def test_haproxy_example_is_valid() -> None:
    cfg = ROOT / "examples" / "haproxy" / "haproxy.cfg"
    res = subprocess.run(
        [need("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = cfg.read_text()
    assert "agent-check" in text and 'agent-send "agent\\n"' in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (nft -c in a scratch namespace)")
def test_nftables_example_is_valid() -> None:
    nft = ROOT / "examples" / "nftables" / "service.nft"
    res = subprocess.run(
        ["unshare", "-n", need("nft"), "-c", "-f", str(nft)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "numgen random mod 3 vmap" in nft.read_text()
