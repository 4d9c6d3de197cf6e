"""The DistServe paper's A100-80GB profiles shipped with the planner: what they hold, where they come
from, that they are the paper's figures, and that a manifest (or `distserve plan`) can name one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from distserve_operator import api, cli
from distserve_planner import plan_deployment, profiles
from distserve_planner.loaders import bundled, profile_files

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
PACKAGE_DATA = ROOT / "operator" / "distserve_planner" / bundled.DIRECTORY
SHARED = Path(os.environ.get("DISTSERVE_SHARED", ROOT.parent / "shared")) / "data" / "distserve-a100"
needs_shared = pytest.mark.skipif(
    not (SHARED / "profiler-a100-80g.distserve.json").is_file(),
    reason=f"DistServe's original profiler files not found under {SHARED} (set DISTSERVE_SHARED): "
    "nothing to compare the bundled conversion with",
)
# bundled name -> (the DistServe file it was converted from, the model in it)
ORIGINS = {
    "opt-13b-a100-80gb-distserve": ("profiler-a100-80g.distserve.json", "facebook/opt-13b"),
    "opt-13b-a100-80gb-vllm": ("profiler-a100-80g.vllm.json", "facebook/opt-13b"),
    "opt-66b-a100-80gb-distserve": ("profiler-a100-80g.distserve.json", "facebook/opt-66b"),
    "opt-66b-a100-80gb-vllm": ("profiler-a100-80g.vllm.json", "facebook/opt-66b"),
}


def _manifest(name: str, **planner: Any) -> api.DistServeDeployment:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["spec"]["planner"] = planner
    return api.parse_resource(doc)


def test_the_package_deploy_profiles_and_the_api_name_the_same_profiles() -> None:
    """The package data is what an installed operator reads, deploy/profiles/ what users read, and
    the API's enum what the CRD accepts: the same four profiles, byte for byte."""
    assert bundled.names() == tuple(sorted(ORIGINS)) == tuple(sorted(p.value for p in api.BundledProfile))
    for name in bundled.names():
        packaged = (PACKAGE_DATA / f"{name}.json").read_bytes()
        assert (ROOT / "deploy" / "profiles" / f"{name}.json").read_bytes() == packaged, (
            f"deploy/profiles/{name}.json differs from the package's: "
            "run python scripts/convert_distserve_profiles.py write"
        )


def test_each_bundled_profile_says_where_its_figures_come_from() -> None:
    for name, (filename, model) in ORIGINS.items():
        p = bundled.load(name)
        assert p.format == profiles.FORMAT and p.model == model and p.device == "A100-80GB"
        prov = p.provenance
        assert prov is not None
        assert prov.repository == "https://github.com/LLMServe/DistServe"
        assert prov.path == f"simdistserve/estimators/profile_data/{filename}"
        assert len(prov.commit) == 40 and len(prov.sha256) == 64
        assert prov.license == "Apache-2.0" and "DistServe Authors" in prov.copyright
        assert prov.converted_by == "scripts/convert_distserve_profiles.py" and model in prov.conversion
        assert [e.pp for e in p.entries] == [1] * len(p.entries)


@needs_shared
def test_bundled_profiles_hold_the_distserve_figures_unchanged() -> None:
    for name, (filename, model) in ORIGINS.items():
        raw_bytes = (SHARED / filename).read_bytes()
        raw = json.loads(raw_bytes)[model]
        p = bundled.load(name)
        assert p.provenance is not None and p.provenance.sha256 == hashlib.sha256(raw_bytes).hexdigest()
        assert sorted(e.tp for e in p.entries) == sorted(int(tp) for tp in raw)
        for tp, row in raw.items():
            e = p.entry(int(tp), 1)
            assert e is not None
            # Exactly the same floats: JSON round trips a float64 unchanged.
            assert e.prefill == tuple(row["prefill"])
            assert e.decode_small == tuple(row["decoding_smallbs"])
            assert e.decode_large == tuple(row["decoding_largebs"])
            assert e.decode_threshold == row["decoding_large_small_bs_threshold"]
            assert e.batching == "packed" and e.decode_ranges is None
        # And the planner reads it as it reads the original through the importer.
        assert profiles.latency_model(p).coefficients(1 if "13b" in name else 2, 1) == profiles.latency_model(
            profile_files.load(SHARED / filename, model)
        ).coefficients(1 if "13b" in name else 2, 1)


@needs_shared
def test_the_conversion_script_reproduces_the_committed_files() -> None:
    spec = importlib.util.spec_from_file_location(
        "convert", ROOT / "scripts" / "convert_distserve_profiles.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["check", "--source", str(SHARED)]) == 0


@needs_shared
def test_the_paper_case_plans_the_same_with_the_bundled_profile_as_with_the_original() -> None:
    dsd = api.load_manifest(EXAMPLES / "opt-13b-a100x4.yaml")
    assert dsd.spec.planner.profile is api.BundledProfile.OPT_13B_A100_80GB_DISTSERVE
    ours = plan_deployment(dsd)
    original = plan_deployment(dsd, profile=SHARED / "profiler-a100-80g.distserve.json")
    a, b = ours.plan, original.plan
    assert a.summary == b.summary and a.estimated == b.estimated
    assert [c.model_dump() for c in a.candidates] == [c.model_dump() for c in b.candidates]
    assert a.colocated == b.colocated
    assert "bundled profile opt-13b-a100-80gb-distserve" in a.profile
    assert ours.assumptions["latencySource"] == "bundled profile opt-13b-a100-80gb-distserve"


def test_a_profile_of_another_model_is_refused_with_the_ones_that_fit() -> None:
    with pytest.raises(ValueError) as info:
        plan_deployment(_manifest("opt-66b-a100-4x8-low.yaml", profile="opt-13b-a100-80gb-distserve"))
    message = str(info.value)
    assert message.startswith("spec.planner.profile: bundled profile opt-13b-a100-80gb-distserve")
    assert "facebook/opt-13b, not facebook/opt-66b" in message
    assert "fix: use opt-66b-a100-80gb-distserve or opt-66b-a100-80gb-vllm" in message
    llama = api.load_manifest(EXAMPLES / "llama3-8b-h100x8.yaml")
    with pytest.raises(
        ValueError, match=r"--profile: bundled profile opt-66b-a100-80gb-vllm.*distserve profile"
    ):
        plan_deployment(llama, profile="opt-66b-a100-80gb-vllm")


def test_a_parsed_profile_object_is_planned_with_as_given() -> None:
    profile = bundled.load("opt-13b-a100-80gb-distserve").model_copy(update={"source": "ConfigMap ns/mine"})
    report = plan_deployment(_manifest("opt-13b-a100x4.yaml"), profile=profile)
    assert report.plan.profile.startswith("ConfigMap ns/mine (facebook/opt-13b")
    assert report.assumptions["latencySource"] == "profile"
    with pytest.raises(ValueError, match="not JSON"):
        profiles.parse("{", source="ConfigMap ns/mine")


def test_distserve_plan_takes_a_bundled_name_for_either_profile(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(EXAMPLES / "opt-13b-a100x4.yaml")
    args = ["plan", "-f", example, "-q", "-o", "json", "--colocated-profile", "opt-13b-a100-80gb-vllm"]
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert "bundled profile opt-13b-a100-80gb-vllm" in data["assumptions"]["colocatedLatency"]
    assert cli.main(["plan", "-f", example, "-q", "--profile", "opt-13b-a100-80gb"]) == 2
    err = capsys.readouterr().err
    assert "--profile opt-13b-a100-80gb: no such file, nor a bundled profile" in err
    assert "opt-13b-a100-80gb-distserve" in err
