"""`portshard doctor` on the real kernel: every check present and well formed, the features this
machine has reported as working, missing privilege reported clearly, nothing left behind.

No fixed ports (probes bind port 0 on loopback), no sysctl written, no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from portshard import doctor
from portshard.doctor.registry import ORDER
from tests.conftest import PYTHON, ROOT

# The report's keys in its order: the registry's ORDER, which every registered probe must be in
# (probe_all puts a probe missing from it last, so the lists below would differ).
KEYS = list(ORDER)
# What root on a Linux 6.x kernel must be able to do.
ROOT_FEATURES = [
    "reuseport",
    "reuseport_cbpf",
    "syn_hold",
    "reuseport_ebpf",
    "sock_ops_inflight",
    "seccomp_user_notif_addfd",
    "pidfd_getfd",
    "worker_trees",
]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux probes")


def run_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [PYTHON, "-m", "portshard", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"doctor exited {proc.returncode}; stderr:\n{proc.stderr}"
    return proc


def doctor_json(env: dict[str, str] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run_doctor("--json", env=env).stdout)
    return report


def test_json_has_every_check_with_its_shape() -> None:
    report = doctor_json()
    assert report["platform"] == sys.platform
    assert report["kernel"] == os.uname().release
    assert list(report["checks"]) == KEYS
    for key, check in report["checks"].items():
        assert set(check) == {"ok", "value", "detail", "enables"}, key
        assert isinstance(check["ok"], bool), key
        assert check["value"] is None or isinstance(check["value"], str | int | bool), key
        assert isinstance(check["detail"], str) and check["detail"], key
        assert isinstance(check["enables"], str) and check["enables"], key


@linux_only
def test_linux_values_say_what_was_found() -> None:
    checks = doctor_json()["checks"]
    lb = checks["reuseport_lb"]
    assert lb["ok"] is False and "already balances" in lb["detail"]
    assert checks["euid"]["value"] == os.geteuid()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert checks["somaxconn"]["ok"] is True and checks["somaxconn"]["value"] == somaxconn
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    if migrate.exists():
        assert checks["tcp_migrate_req"]["value"] == int(migrate.read_text())
        assert "may set" in checks["tcp_migrate_req"]["detail"]


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="eBPF steering needs root (CAP_BPF)")
@pytest.mark.skipif(int(os.uname().release.split(".")[0]) < 6, reason="expects a 6.x kernel")
def test_root_on_linux_6_has_every_feature_portshard_uses() -> None:
    checks = doctor_json()["checks"]
    failed = {k: checks[k]["detail"] for k in ROOT_FEATURES if not checks[k]["ok"]}
    assert not failed
    assert checks["euid"]["ok"] is True
    assert "WAIT_KILLABLE_RECV: yes" in checks["seccomp_user_notif_addfd"]["detail"]


def test_plain_output_has_one_line_per_check() -> None:
    ok = {key: c["ok"] for key, c in doctor_json()["checks"].items()}
    lines = run_doctor().stdout.splitlines()
    table = [line.split() for line in lines if line[:3] in ("ok ", "no ")]
    assert [row[1] for row in table] == KEYS
    assert {row[1]: row[0] == "ok" for row in table} == ok
    for key in (k for k, good in ok.items() if not good):
        assert any(line.startswith(f"  {key}: ") for line in lines), f"no reason shown for {key}"


@linux_only
def test_no_process_is_left_behind() -> None:
    mark = f"PORTSHARD_DOCTOR_TEST={uuid.uuid4()}"
    name, _, value = mark.partition("=")
    run_doctor("--json", env={**os.environ, name: value})
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark.encode() in (entry / "environ").read_bytes():
                left.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert not left, f"doctor left processes behind: {left}"


def _children() -> set[int]:
    """Pids of this process's children, zombies included (reaped ones are gone)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


@linux_only
@pytest.mark.skipif(
    not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
    reason="kernel without CONFIG_PROC_CHILDREN",
)
def test_probing_leaks_no_fd_and_no_child() -> None:
    fds, children = sorted(os.listdir("/proc/self/fd")), _children()
    checks = doctor.probe_all()
    assert [c.key for c in checks] == KEYS
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert _children() == children


# Drop to nobody inside the child, after importing everything: the interpreter may live where
# nobody cannot read (here, under /root). A uid change leaves the process not dumpable (unless
# fs.suid_dumpable=1), which denies pidfd_getfd on its own children: DUMPABLE=1 makes it look
# like an ordinary user's process, DUMPABLE=0 like a worker just dropped to --user.
AS_NOBODY = """
import ctypes, json, os, pwd, sys
from portshard import doctor
from portshard.doctor.registry import ORDER
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
if sys.argv[1] == "1":
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
print(json.dumps(doctor.to_json(doctor.probe_all())))
"""


def doctor_as_nobody(dumpable: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [PYTHON, "-c", AS_NOBODY, "1" if dumpable else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    checks: dict[str, Any] = json.loads(proc.stdout)["checks"]
    return checks


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_without_privilege_ebpf_says_eperm_and_the_rest_still_works() -> None:
    checks = doctor_as_nobody(dumpable=True)
    ebpf = checks["reuseport_ebpf"]
    assert ebpf["ok"] is False
    assert "EPERM" in ebpf["detail"] and "CAP_BPF" in ebpf["detail"]
    assert checks["euid"]["ok"] is False and checks["euid"]["value"] != 0
    assert "needs root or CAP_NET_ADMIN" in checks["tcp_migrate_req"]["detail"]
    # No privilege needed for these.
    for key in ("reuseport", "reuseport_cbpf", "seccomp_user_notif_addfd", "pidfd_getfd"):
        assert checks[key]["ok"], (key, checks[key]["detail"])


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_after_a_uid_change_pidfd_getfd_says_why_it_is_denied() -> None:
    pidfd = doctor_as_nobody(dumpable=False)["pidfd_getfd"]
    if Path("/proc/sys/fs/suid_dumpable").read_text().strip() == "1":
        assert pidfd["ok"] is True  # the kernel keeps such processes dumpable
    else:
        assert pidfd["ok"] is False and pidfd["value"] == "pidfd_open only"
        assert "not dumpable" in pidfd["detail"] and "EPERM" in pidfd["detail"]


@linux_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_syn_hold_says_what_the_supervisor_will_find_without_cap_net_admin() -> None:
    # This kernel refuses SO_ATTACH_FILTER without CAP_NET_ADMIN: a one-slot handover then
    # kills the idle old worker instead of its graceful stop (test_faults.py). The doctor
    # said nothing of it; its answer must match a real attempt under the same capabilities.
    wrap = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    attempt = (
        "import socket\nfrom portshard.steering import cbpf\n"
        "try:\n    cbpf.drop_syns(socket.socket()); print('yes')\n"
        "except PermissionError:\n    print('no')\n"
    )
    probe = subprocess.run([*wrap, PYTHON, "-c", attempt], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    report = subprocess.run(
        [*wrap, PYTHON, "-m", "portshard", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    check = json.loads(report.stdout)["checks"]["syn_hold"]
    assert check["ok"] is (probe.stdout.strip() == "yes"), check
    if not check["ok"]:
        assert "CAP_NET_ADMIN" in check["detail"]
