"""The Dockerfiles, checked without a Docker engine (none runs here or in CI; `make lint` runs hadolint
on them too): what they copy exists and is sent, they pin their bases, install the package with
pyproject's dependencies rather than a second list, run as the uid the pods ask for, start the
`distserve` script, and expose the ports the chart and the operator's pods use."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.manifests import dsd

from distserve_operator import children
from distserve_operator.api import Estimate, PhasePlan, PlanStatus, parse_spec
from distserve_operator.api.spec import RouterSpec, WorkerSpec

ROOT = Path(__file__).parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()
CHART = ROOT / "charts" / "distserve"
OPERATOR, WORKER = "operator/Dockerfile", "worker/Dockerfile"
# pip options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "--index-url",
    "-i",
    "--extra-index-url",
    "--prefix",
    "--target",
    "-t",
    "--wheel-dir",
    "-w",
}
PIP_VALUE_OPTIONS |= {"-r", "--requirement", "-c", "--constraint", "--find-links", "-f", "--root"}


@dataclass
class Stage:
    base: str
    name: str | None
    # (instruction, its arguments), continuation lines joined, comments dropped.
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]


def parse(path: str) -> list[Stage]:
    """The stages of a Dockerfile (instructions before the first FROM, i.e. ARGs, are left out)."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / path).read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(base=words[0], name=words[2] if len(words) > 2 else None))
        elif stages:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def dockerfiles() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("Dockerfile*"), *ROOT.glob("*/Dockerfile*")])


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.*)$", MAKEFILE, re.M)
    assert match, f"the Makefile sets no {name}"
    return match.group(1).strip()


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of each `pip install` in a RUN (its --mount flags and other commands left out)."""
    out = []
    for command in re.split(r"&&|\|\||;|\|", run):
        words = shlex.split(command)
        while words and words[0].startswith("--mount"):
            words = words[1:]
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        if words[:2] == ["pip", "install"]:
            out.append(words[2:])
    return out


def requirement_names(args: list[str]) -> set[str]:
    """The distribution names a pip install asks for by name (not paths, wheels or option values)."""
    names, skip = set(), False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg in PIP_VALUE_OPTIONS
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", arg)
        if match and not arg.startswith((".", "/")) and not match.group().endswith(".whl"):
            names.add(canonical(match.group()))
    return names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Every distribution pyproject declares (core and extras) -> where it is declared."""
    project = PYPROJECT["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {
        canonical(re.match(r"[A-Za-z0-9._-]+", req).group()): group  # type: ignore[union-attr]
        for group, reqs in groups.items()
        for req in reqs
    }


def exposed(path: str) -> set[int]:
    return {int(p.split("/")[0]) for args in parse(path)[-1].all("EXPOSE") for p in args.split()}


def uid(path: str) -> int:
    users = parse(path)[-1].all("USER")
    assert users, f"{path}: the final stage sets no USER (it would run as root)"
    return int(users[-1].split(":")[0])


def exec_form(path: str, instruction: str) -> list[str]:
    values = parse(path)[-1].all(instruction)
    assert len(values) == 1, f"{path}: one {instruction} in the final stage"
    form = yaml.safe_load(values[0])
    assert isinstance(form, list), f"{path}: {instruction} in exec form, so signals reach the process"
    return form


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


# ------------------------------------------------------------------------------ every Dockerfile


def test_make_lints_and_builds_every_dockerfile():
    assert makefile_var("DOCKERFILES").split() == dockerfiles() == [OPERATOR, WORKER]
    assert re.search(r"^\t\$\(BIN\)/hadolint \$\(DOCKERFILES\)$", MAKEFILE, re.M), "make lint runs hadolint"
    images = MAKEFILE[MAKEFILE.index("\nimages:") :]
    for path in dockerfiles():
        assert f"-f {path}" in images


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_images_skips_where_no_docker_engine_runs(tmp_path: Path):
    """Here and in CI: it says so and succeeds (a `docker` whose `info` fails stands for no engine)."""
    (tmp_path / "docker").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "docker").chmod(0o755)
    (tmp_path / "sed").symlink_to(shutil.which("sed"))  # type: ignore[arg-type]
    make = shutil.which("make")
    assert make
    env = {"PATH": str(tmp_path)}
    result = subprocess.run(
        [make, "-s", "images"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no Docker engine reachable; skipping" in result.stdout


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_base_images_are_pinned_by_tag(path: str):
    stages = parse(path)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        assert "$" not in stage.base, f"{path}: FROM {stage.base}: a literal image, so it can be checked"
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, (
            f"{path}: FROM {stage.base} is not pinned"
        )


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_every_copy_source_exists_and_is_sent_to_the_builder(path: str):
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    # .dockerignore sends nothing but what it names with `!`.
    assert ignore[ignore.index("*") + 1 :], ".dockerignore starts from nothing sent"
    sent = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [args.split() for stage in parse(path) for args in stage.all("COPY") + stage.all("ADD")]
    assert copies
    for words in copies:
        if any(w.startswith("--from") for w in words):
            continue
        for source in (w for w in words[:-1] if not w.startswith("--")):
            assert (ROOT / source).exists(), f"{path}: COPY {source}: no such file in the repository"
            assert source.rstrip("/").split("/")[0] in sent, (
                f"{path}: COPY {source}: .dockerignore leaves it out"
            )


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_pip_keeps_no_cache(path: str):
    installs = [args for stage in parse(path) for run in stage.all("RUN") for args in pip_installs(run)]
    assert installs
    for args in installs:
        assert "--no-cache-dir" in args, f"{path}: pip install {' '.join(args)}"


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_no_dockerfile_repeats_a_dependency_pyproject_declares(path: str):
    """The images get their dependencies from pyproject by installing the package; torch alone is
    installed first in the worker image, pinned to the Makefile's version (as `make install` does)."""
    allowed = {"torch"} if path == WORKER else set()
    deps = declared()
    for stage in parse(path):
        for run in stage.all("RUN"):
            for args in pip_installs(run):
                repeated = (requirement_names(args) & deps.keys()) - allowed
                assert not repeated, (
                    f"{path}: {sorted(repeated)} are in pyproject already: install the package"
                )


def test_the_helper_sees_a_repeated_dependency():
    run = '--mount=type=bind,target=/w pip install --no-cache-dir --prefix=/install "kopf>=1.37" ./x.whl .'
    assert requirement_names(pip_installs(run)[0]) == {"kopf"}
    assert requirement_names(["--index-url", "https://x", "torch==${TORCH_VERSION}"]) == {"torch"}


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_runs_as_the_non_root_uid_the_pods_ask_for(path: str):
    assert uid(path) != 0
    assert uid(path) == children.RUN_AS_USER
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert set(re.findall(r"runAsUser: (\d+)", deployment)) == {str(uid(OPERATOR))}


@pytest.mark.parametrize("path", [OPERATOR, WORKER])
def test_the_entrypoint_is_the_distserve_script(path: str):
    assert exec_form(path, "ENTRYPOINT") == ["distserve"]
    assert "distserve" in PYPROJECT["project"]["scripts"]


# ------------------------------------------------------------------------------ the operator image


def test_operator_image_installs_the_core_dependencies_only():
    (build, *_), final = parse(OPERATOR), parse(OPERATOR)[-1]
    installs = [args for run in build.all("RUN") for args in pip_installs(run)]
    assert [a for args in installs for a in args if not a.startswith("-")] == ["."]
    assert not any("--no-deps" in args for args in installs)
    assert "worker" in PYPROJECT["project"]["optional-dependencies"]
    assert final.all("COPY") == ["--from=build /install /usr/local"]


def test_operator_image_serves_what_the_chart_probes_and_scrapes():
    values = chart_values()
    assert {values["metrics"]["port"], values["liveness"]["port"]} <= exposed(OPERATOR)
    command = exec_form(OPERATOR, "CMD")
    assert command[0] == "operator"
    assert f"--liveness=http://0.0.0.0:{values['liveness']['port']}/healthz" in command
    # The chart passes args only: the image's ENTRYPOINT runs them.
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "command:" not in deployment
    assert re.search(r"args:\n\s+- operator\n", deployment)
    assert values["image"]["repository"] == "ghcr.io/distserve/operator"
    assert "-t ghcr.io/distserve/operator:$(IMAGE_TAG)" in MAKEFILE


# ------------------------------------------------------------------------------ the worker image


def test_worker_image_installs_torch_as_the_makefile_does_then_the_worker_extra():
    final = parse(WORKER)[-1]
    installs = [args for run in final.all("RUN") for args in pip_installs(run)]
    torch_first, package = installs
    assert requirement_names(torch_first) == {"torch"}
    assert "torch==${TORCH_VERSION}" in torch_first
    assert "${TORCH_INDEX_URL}" in torch_first
    args = dict(a.split("=", 1) for a in final.all("ARG"))
    assert args["TORCH_VERSION"] == makefile_var("TORCH_VERSION")
    assert "--build-arg TORCH_VERSION=$(TORCH_VERSION)" in MAKEFILE
    assert "TORCH_INDEX_URL" in args
    assert [a for a in package if not a.startswith("-")] == [
        "$(find /wheels -name 'distserve-*.whl')[worker]"
    ]


def _worker_pods() -> list[dict[str, Any]]:
    spec = parse_spec(dsd("llm", model={"name": "meta-llama/Meta-Llama-3-8B-Instruct"})["spec"])
    p, d = PhasePlan(tp=1, pp=1, replicas=1), PhasePlan(tp=1, pp=1, replicas=1)
    plan = PlanStatus(
        prefill=p, decode=d, affinity="High", gpus=2, summary="s", estimated=Estimate(goodput_per_gpu=1.0)
    )
    objs = children.render_all("llm", spec, plan, namespace="serving")
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("StatefulSet", "Deployment")]


def test_worker_image_serves_what_the_operators_pods_run():
    assert WorkerSpec().image == f"ghcr.io/distserve/worker:{app_version()}"
    assert "-t ghcr.io/distserve/worker:$(IMAGE_TAG)" in MAKEFILE
    defaults = {WorkerSpec().grpc_port, WorkerSpec().metrics_port, RouterSpec().port}
    assert defaults <= exposed(WORKER)
    pods = _worker_pods()
    assert {"prefill", "decode", "router"} <= {c["name"] for pod in pods for c in pod["containers"]}
    env = dict(a.split("=", 1) for e in parse(WORKER)[-1].all("ENV") for a in shlex.split(e))
    for pod in pods:
        assert pod["securityContext"]["runAsUser"] == uid(WORKER)
        for container in pod["containers"]:
            assert container["command"][0] == exec_form(WORKER, "ENTRYPOINT")[0]
            # A read-only root filesystem: the image's caches must lie on a volume the pod mounts.
            if container["securityContext"].get("readOnlyRootFilesystem"):
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert Path(env["HF_HOME"]).parents[-2].as_posix() in mounts
