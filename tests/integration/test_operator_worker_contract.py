"""The pods the operator renders run commands the worker CLI accepts, with probes it serves.

Both sides are real: the operator's renderer (children.render_all) over a real plan, and the
worker's own argument parser and HTTP routes. A renamed flag on either side fails here, not in a
cluster's CrashLoopBackOff.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from distserve_operator import children
from distserve_operator.api import load_manifest
from distserve_operator.planner import plan_deployment
from distserve_worker import cli_worker

ROOT = Path(__file__).parents[2]
EXAMPLES = ["llama3-8b-h100x8.yaml", "opt-66b-a100-4x8-low.yaml"]


def _containers(example: str) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    dsd = load_manifest(ROOT / "deploy" / "examples" / example)
    plan = plan_deployment(dsd).status
    out = []
    for obj in children.render_all(dsd.metadata.name, dsd.spec, plan):
        if obj["kind"] in ("StatefulSet", "Deployment"):
            out += [(obj["metadata"]["name"], c) for c in obj["spec"]["template"]["spec"]["containers"]]
    return out


@pytest.mark.parametrize("example", EXAMPLES)
def test_rendered_commands_parse_with_the_worker_cli(example: str) -> None:
    roles = set()
    for name, container in _containers(example):
        argv = [*container.get("command", []), *container.get("args", [])]
        assert argv[:2] == ["distserve", "worker"], name
        parser = argparse.ArgumentParser(prog="distserve worker", exit_on_error=False)
        cli_worker.add_arguments(parser)
        args = parser.parse_args(argv[2:])
        roles.add(args.role)
        # Ports the probes and Services use are the ports the worker listens on.
        ports = {p["containerPort"] for p in container.get("ports", [])}
        for flag in ("port", "http_port"):
            value = getattr(args, flag, None)
            if value:  # 0 means no separate port (the router serves probes on its API port)
                assert int(value) in ports, f"{name}: --{flag} {value} not among container ports {ports}"
        probe_port = container["readinessProbe"]["httpGet"]["port"]
        named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert named.get(probe_port, probe_port) in ports
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert roles == {"prefill", "decode", "router"}
