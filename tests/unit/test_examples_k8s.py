"""examples/k8s/deployment.yaml holds together (kubectl is not available here: the structure is
checked, and the probes and hooks it names are the ones portshard serves; bench/netbed/ runs
the same drain and health for real behind HAProxy and nftables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "examples" / "k8s" / "deployment.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d.get("kind")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    assert kinds["Deployment"]["apiVersion"] == "apps/v1" and kinds["Service"]["apiVersion"] == "v1"
    return kinds


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _container() -> tuple[dict[str, Any], dict[str, Any]]:
    dep = _docs()["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def _port(container: dict[str, Any], ref: str | int) -> int:
    if isinstance(ref, int):
        return ref
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ref in by_name, f"port {ref!r} is not one of the container's {sorted(by_name)}"
    return int(by_name[ref])


def test_deployment_selects_its_own_pods() -> None:
    dep = _docs()["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_container_runs_portshard_with_health_and_listen() -> None:
    _, c = _container()
    cmd = c["command"]
    assert cmd[:2] == ["portshard", "run"] and "--" in cmd
    listen = _option(cmd, "--listen")
    assert listen.startswith("tcp://") and int(listen.rsplit(":", 1)[1]) == _port(c, "http")
    health = _option(cmd, "--health")
    assert int(health.rsplit(":", 1)[1]) == _port(c, "health")
    assert not health.startswith("127."), "a probe from kubelet cannot reach loopback"
    assert all(isinstance(a, str) for a in cmd), "every argument a string (YAML: quote numbers)"


def test_readiness_probe_is_healthz_on_the_health_port() -> None:
    _, c = _container()
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert _port(c, probe["port"]) == int(_option(c["command"], "--health").rsplit(":", 1)[1])
    assert c["readinessProbe"]["failureThreshold"] == 1  # out at the first 503
    assert "httpGet" not in c.get("livenessProbe", {}), "a 503 while draining must not restart"


def test_prestop_drains_the_same_supervisor_within_the_grace_period() -> None:
    pod, c = _container()
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["portshard", "drain"] and "--wait" in hook
    assert _option(hook, "--name") == _option(c["command"], "--name")
    deadline = float(_option(hook, "--deadline"))
    grace = pod["terminationGracePeriodSeconds"]
    probe = c["readinessProbe"]
    assert deadline >= 2 * probe["periodSeconds"], "the endpoint must be out before it stops"
    assert grace >= deadline + 10, f"grace {grace}s leaves no margin over the {deadline}s drain"


def test_service_targets_the_http_port_of_these_pods() -> None:
    docs = _docs()
    _, c = _container()
    svc = docs["Service"]["spec"]
    assert (
        svc["selector"].items()
        <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    (port,) = svc["ports"]
    assert _port(c, port["targetPort"]) == _port(c, "http")
