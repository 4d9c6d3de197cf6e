"""The pods the operator renders run commands the worker CLI accepts, under a plan file it obeys,
with probes it serves and environment it reads.

Both sides are real: the operator's renderer (children.render_all) over a real plan of every
example (and of pinned pipeline-parallel variants, which no example plans), and the worker's own argument parser, its contract check (`cli_worker.obey`) and its
sources. A renamed flag, a dead environment variable or a plan.json the worker refuses fails here,
not in a cluster's CrashLoopBackOff.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from distserve_operator import children
from distserve_operator import labels as L
from distserve_operator.api import DistServeDeployment, PlanStatus, RuntimeContract, load_manifest
from distserve_planner import plan_deployment
from distserve_worker import cli_worker

ROOT = Path(__file__).parents[2]
WORKER_SOURCES = ROOT / "worker" / "distserve_worker"
NAMESPACE = "serving"
# Pipeline-parallel variants of an example (none of the examples plans pp > 1): the example file,
# the pin, and the placement; SharedPod needs Low affinity and equal pp and replicas.
PP2 = "llama3-8b-h100x8-pinned.yaml"
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "pp2-separate-pods": (
        PP2,
        {"prefill": {"tp": 1, "pp": 2, "replicas": 1}, "decode": {"tp": 1, "pp": 2, "replicas": 2}},
        {"affinity": "High"},
    ),
    "pp2-shared-pod": (
        PP2,
        {"prefill": {"tp": 1, "pp": 2, "replicas": 2}, "decode": {"tp": 1, "pp": 2, "replicas": 2}},
        {"affinity": "Low", "stageLayout": "SharedPod"},
    ),
}
EXAMPLES = sorted(p.name for p in (ROOT / "deploy" / "examples").glob("*.yaml")) + sorted(VARIANTS)

Obj = dict[str, Any]


def _load(case: str) -> DistServeDeployment:
    if case not in VARIANTS:
        return load_manifest(ROOT / "deploy" / "examples" / case)
    example, pin, placement = VARIANTS[case]
    dsd = load_manifest(ROOT / "deploy" / "examples" / example)
    spec = dsd.spec.model_copy(
        update={
            "planner": dsd.spec.planner.model_validate({**dsd.spec.planner.to_wire(), "pin": pin}),
            "placement": dsd.spec.placement.model_validate({**dsd.spec.placement.to_wire(), **placement}),
        }
    )
    return dsd.model_copy(update={"spec": spec})


@functools.cache
def _rendered(example: str) -> tuple[DistServeDeployment, PlanStatus, list[Obj]]:
    dsd = _load(example)
    plan = plan_deployment(dsd).status
    return dsd, plan, children.render_all(dsd.metadata.name, dsd.spec, plan, namespace=NAMESPACE)


def test_the_pipeline_variants_plan_what_they_pin() -> None:
    """Else the pp > 1 cases below would pass without pipeline stages (or SharedPod) at all."""
    for case, (_, pin, placement) in VARIANTS.items():
        dsd, plan, objs = _rendered(case)
        for role in ("prefill", "decode"):
            phase = plan.prefill if role == "prefill" else plan.decode
            assert (phase.tp, phase.pp, phase.replicas) == tuple(
                pin[role][k] for k in ("tp", "pp", "replicas")
            )
        sets = sorted(o["metadata"]["name"] for o in objs if o["kind"] == "StatefulSet")
        name, rev = dsd.metadata.name, children.revision(plan)
        if placement.get("stageLayout") == "SharedPod":
            assert children.shared_pod_layout(dsd.spec, plan)
            assert sets == [f"{name}-pd-{rev}-s0", f"{name}-pd-{rev}-s1"]
        else:
            assert sets == sorted(f"{name}-{r}-{rev}-s{i}" for r in ("prefill", "decode") for i in (0, 1))


def _containers(example: str) -> list[tuple[Obj, Obj]]:
    """(owning StatefulSet or Deployment, container) for every container the operator renders."""
    _, _, objs = _rendered(example)
    return [
        (obj, c)
        for obj in objs
        if obj["kind"] in ("StatefulSet", "Deployment")
        for c in obj["spec"]["template"]["spec"]["containers"]
    ]


def _plan_json(example: str) -> str:
    _, _, objs = _rendered(example)
    router, workers = (o for o in objs if o["kind"] == "ConfigMap")
    assert router["data"] == workers["data"]  # the router's plan and the copy the workers mount
    return str(workers["data"][children.PLAN_KEY])


def _parse(container: Obj) -> argparse.Namespace:
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["distserve", "worker"], container["name"]
    parser = argparse.ArgumentParser(prog="distserve worker", exit_on_error=False)
    cli_worker.add_arguments(parser)
    return parser.parse_args(argv[2:])


@pytest.mark.parametrize("example", EXAMPLES)
def test_rendered_commands_parse_with_the_worker_cli(example: str) -> None:
    roles = set()
    for owner, container in _containers(example):
        name = owner["metadata"]["name"]
        args = _parse(container)
        roles.add(args.role)
        assert args.plan_file == children.PLAN_FILE
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


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_worker_obeys_the_rendered_plan_file(
    example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's plan.json, mounted where the command says, is a contract each worker accepts,
    and what it then runs (tp, stage, layers, rank ports, limits) is what the pod was sized for."""
    dsd, plan, objs = _rendered(example)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    sets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "StatefulSet"}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(_plan_json(example))
    contract = RuntimeContract.model_validate_json(plan_file.read_text())
    assert contract.limits == plan.limits  # exactly what the planner simulated
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    admitted = policy["spec"]["ingress"][0]["ports"]
    stages_seen: dict[str, set[int]] = {"prefill": set(), "decode": set()}
    for owner, container in _containers(example):
        args = _parse(container)
        args.plan_file = str(plan_file)
        # The pod's name (`<sts>-<ordinal>`, from the downward API) gives the worker its ordinal.
        monkeypatch.setenv("POD_NAME", f"{owner['metadata']['name']}-0")
        obeyed = cli_worker.obey(args)  # raises ContractError if the worker would refuse it
        assert obeyed.model.name == dsd.spec.model.name
        assert obeyed.limits == plan.limits
        if args.role not in ("prefill", "decode"):
            continue
        phase = plan.prefill if args.role == "prefill" else plan.decode
        stage = int(owner["spec"]["template"]["metadata"]["labels"][L.STAGE])
        span = contract.phase(args.role).stages[stage].layers
        assert (obeyed.tp, obeyed.pp, obeyed.stage) == (phase.tp, phase.pp, stage), owner["metadata"]["name"]
        assert obeyed.layers == (span.start, span.end)
        stages_seen[args.role].add(stage)
        gpus = container["resources"].get("limits", {}).get(dsd.spec.cluster.gpu.resource_name)
        assert gpus in (None, str(obeyed.tp))  # None: a CPU cluster requests no GPUs
        # Follower ranks listen where the worker will put them, and peers may reach them.
        followers = sorted(p["containerPort"] for p in container["ports"] if "-rank" in p["name"])
        assert followers == [obeyed.rank_port_base + r for r in range(1, obeyed.tp)]
        for port in followers:
            assert any(rule["port"] <= port <= rule.get("endPort", rule["port"]) for rule in admitted), port
        # Instance 0's stages, each at the DNS name of its pod under the Service governing its
        # StatefulSet, on a gRPC port that the pod's container of this role listens on.
        assert len(obeyed.stage_addresses) == (phase.pp if phase.pp > 1 else 0)
        for i, address in enumerate(obeyed.stage_addresses):
            host, port = address.rsplit(":", 1)
            pod, service, namespace, svc = host.split(".")
            assert (namespace, svc) == (NAMESPACE, "svc"), address
            assert service in sets and service in services, address  # both rendered
            assert sets[service]["spec"]["serviceName"] == service, address  # and it governs the set
            stage_set = sets[service]
            assert pod == f"{service}-0", address
            stage_pods = stage_set["spec"]["template"]
            assert stage_pods["metadata"]["labels"][L.STAGE] == str(i), address
            governing = services[service]["spec"]
            assert governing["clusterIP"] == "None" and governing["publishNotReadyAddresses"] is True
            assert all(stage_pods["metadata"]["labels"].get(k) == v for k, v in governing["selector"].items())
            (peer,) = [c for c in stage_pods["spec"]["containers"] if c["name"] == args.role]
            assert int(port) in {
                p["containerPort"] for p in peer["ports"] if p["name"] == f"grpc-{args.role}"
            }
            # ... and the NetworkPolicy lets this stage's pods reach it there.
            assert any(r["port"] <= int(port) <= r.get("endPort", r["port"]) for r in admitted), address
        if phase.pp > 1:
            assert obeyed.stage_addresses[stage].startswith(f"{owner['metadata']['name']}-0."), "itself"
    # Every stage of both roles runs somewhere, and the stages cover the model's layers.
    for role in ("prefill", "decode"):
        phase = contract.phase(role)
        assert stages_seen[role] == set(range(phase.pp))
        assert contract.shape is not None and phase.stages[-1].layers.end == contract.shape.layers


def _flag_env_names() -> dict[str, str]:
    """DISTSERVE_<FLAG> -> flag dest, for every flag of the worker CLI."""
    parser = argparse.ArgumentParser()
    cli_worker.add_arguments(parser)
    return {
        f"DISTSERVE_{a.dest.upper()}": a.dest
        for a in parser._actions
        if a.option_strings and a.dest != "help"
    }


def _environ_reads() -> set[str]:
    """DISTSERVE_* names the worker reads from os.environ directly, anywhere in its sources."""
    pattern = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["'](DISTSERVE_[A-Z0-9_]+)["']""")
    found: set[str] = set()
    for path in WORKER_SOURCES.rglob("*.py"):
        found |= set(pattern.findall(path.read_text()))
    return found


def test_the_worker_reads_what_the_environment_check_assumes() -> None:
    # If these moved, the check below would pass vacuously.
    assert {"DISTSERVE_MODEL_ROOT", "DISTSERVE_CACHE_DIR"} <= _environ_reads()
    assert {"DISTSERVE_STAGE", "DISTSERVE_PLAN_FILE"} <= set(_flag_env_names())


@pytest.mark.parametrize("example", EXAMPLES)
def test_no_rendered_environment_variable_is_dead(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DISTSERVE_* variable on a container running the worker is one the worker reads: the
    environment default of one of its flags (which then takes the value), or a direct read."""
    flags, direct = _flag_env_names(), _environ_reads()
    user_env = {e.name for e in _rendered(example)[0].spec.worker.env}
    checked = 0
    for owner, container in _containers(example):
        for env in container.get("env", []):
            name = env["name"]
            if not name.startswith("DISTSERVE_") or name in user_env:
                continue
            checked += 1
            where = f"{owner['metadata']['name']}/{container['name']}: {name}"
            if name in direct:
                continue
            assert name in flags, f"{where} is rendered but the worker never reads it"
            monkeypatch.setenv(name, env["value"])
            args = _parse(container | {"command": ["distserve", "worker", "decode"]})
            assert str(getattr(args, flags[name])) == env["value"], where
            monkeypatch.delenv(name)
    dsd = _rendered(example)[0]
    if dsd.spec.model.source.kind.value == "PVC":
        assert checked, "a PVC model's root must reach the worker"


def test_plan_file_round_trips_through_json() -> None:
    """What the operator writes is what the worker library loads (no field lost on the way)."""
    text = _plan_json("llama3-8b-h100x8-pinned.yaml")
    contract = RuntimeContract.model_validate(json.loads(text))
    assert contract.plan is not None and contract.plan.pinned
    assert (contract.prefill.tp, contract.decode.tp, contract.decode.replicas) == (2, 1, 2)
    assert contract.limits.decode_max_batch == 128 and contract.limits.prefill_token_budget == 4096
