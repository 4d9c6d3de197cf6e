"""The import contracts in pyproject.toml (what `make lint` runs `lint-imports` for): kept by the
repository, and broken, each by name, when a forbidden import is planted in a copy of it."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SOURCE_ROOTS = ("operator", "worker", "protos")

# contract id -> (module file to plant in, the planted line, what the report must show)
PLANTED = {
    "planner-pure": [
        ("operator/distserve_planner/search.py", "import kopf", "distserve_planner.search -> kopf"),
        # Indirect: through the controller's kube client to kubernetes.
        (
            "operator/distserve_planner/memory.py",
            "from distserve_operator import kube",
            "distserve_planner.memory -> distserve_operator.kube",
        ),
    ],
    "planner-core-takes-data": [
        (
            "operator/distserve_planner/core.py",
            "from distserve_planner.loaders import traces",
            "distserve_planner.core -> distserve_planner.loaders.traces",
        ),
    ],
    "report-formats": [
        (
            "operator/distserve_planner/report.py",
            "from distserve_planner import core",
            "distserve_planner.report -> distserve_planner.core",
        ),
    ],
    "api-standalone": [
        (
            "operator/distserve_operator/api/spec.py",
            "from distserve_operator import reconcile",
            "distserve_operator.api.spec -> distserve_operator.reconcile",
        ),
    ],
    "operator-no-worker-deps": [
        (
            "operator/distserve_operator/children.py",
            "import numpy",
            "distserve_operator.children -> numpy",
        ),
        # Indirect: through the worker package to torch.
        (
            "operator/distserve_planner/latency.py",
            "from distserve_worker import engine",
            "distserve_planner.latency -> distserve_worker.engine",
        ),
    ],
    "plot-extra-only-here": [
        (
            "operator/distserve_planner/curves.py",
            "import matplotlib.pyplot",
            "distserve_planner.curves -> matplotlib",
        ),
    ],
    "engine-no-grpc": [
        (
            "worker/distserve_worker/engine/sequence.py",
            "import grpc",
            "distserve_worker.engine.sequence -> grpc",
        ),
    ],
}


def contracts() -> dict[str, str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c["name"] for c in config["tool"]["importlinter"]["contracts"]}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the sources under `root`: its PYTHONPATH, not an editable install elsewhere."""
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is missing: install the dev extras (pip install -e '.[dev]')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / r) for r in SOURCE_ROOTS)}
    return subprocess.run(
        [found, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """One copy of the sources with every violation below planted, linted once."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copy(ROOT / "pyproject.toml", root)
    for name in SOURCE_ROOTS:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for plants in PLANTED.values():
        for path, line, _ in plants:
            module = root / path
            module.write_text(f"{module.read_text()}\n{line}  # planted\n")
    return lint_imports(root)


def test_every_contract_has_a_planted_violation():
    assert set(contracts()) == set(PLANTED)


def test_the_repository_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contracts().values():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize("contract", sorted(PLANTED))
def test_a_planted_import_breaks_its_contract(planted: subprocess.CompletedProcess[str], contract: str):
    assert planted.returncode != 0
    assert f"{contracts()[contract]} BROKEN" in planted.stdout, planted.stdout + planted.stderr
    # The report wraps long lines: compare with the whitespace taken out.
    report = "".join(planted.stdout.split())
    for _, _, shown in PLANTED[contract]:
        assert "".join(shown.split()) in report, planted.stdout


def test_every_source_folder_is_a_package():
    """lint-imports skips a folder without __init__.py (and every import in it) without a word."""
    roots = {ROOT / name for name in SOURCE_ROOTS}  # source roots: never packages (see DESIGN.md)
    folders = {module.parent for root in roots for module in root.rglob("*.py")} - roots
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []
