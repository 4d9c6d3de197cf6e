"""The committed CRD is what the models generate, is structural, and accepts exactly the examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from distserve_operator.api import crd

ROOT = Path(__file__).parents[2]


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_committed_crd_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for path in crd.CRD_PATHS:
        assert path.read_text() == crd.render(), f"{path} is stale: run `make crds`"
    assert crd.main(["check"]) == 0


def test_stale_crd_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert crd.main(["write"]) == 0
    crd.CRD_PATHS[0].write_text(crd.CRD_PATHS[0].read_text().replace("ttftMillis", "ttftMs"))
    assert crd.main(["check"]) == 1
    assert "make crds" in capsys.readouterr().err


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "title" not in node, path
        assert node.get("type") != "null", path
        if "properties" in node:
            assert "additionalProperties" not in node, path
            assert node.get("type") == "object", path
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            pytest.fail(f"{path}: anyOf without int-or-string is not structural")
    # every spec field is documented
    for path, node in _walk(schema["properties"]["spec"]):
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}.{name} has no description"


def test_crd_names_and_columns() -> None:
    doc = crd.build_crd()
    names = doc["spec"]["names"]
    assert names["shortNames"] == ["dsd"] and names["kind"] == "DistServeDeployment"
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Plan",
        "GPUs",
        "Ready",
        "Goodput/GPU",
        "Age",
    ]


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crd.build_crd(), "1.35", strict=True)


def _spec_validator() -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas follow draft 4 (boolean exclusiveMinimum).
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize(
    "example", sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_validate_against_crd(example: Path) -> None:
    for doc in yaml.safe_load_all(example.read_text()):
        errors = list(_spec_validator().iter_errors(doc))
        assert not errors, [e.message for e in errors]


def test_crd_schema_rejects_wrong_enum_and_bounds() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "examples" / "opt-13b-a100x4.yaml").read_text())
    doc["spec"]["slo"]["ttftMillis"] = 0
    doc["spec"]["placement"]["affinity"] = "Medium"
    messages = [e.message for e in _spec_validator().iter_errors(doc)]
    assert any("Medium" in m for m in messages) and any("0" in m for m in messages)


def test_committed_reference_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    from distserve_operator.api import reference

    monkeypatch.chdir(ROOT)
    assert reference.main(["check"]) == 0, "docs/crd-reference.md is stale: run `make crds`"
    text = reference.render()
    # every spec field a user can set appears, with its bounds
    assert "| `ttftMillis` | integer | **required** | > 0, ≤ 600000 |" in text
    assert "enum: `Auto`, `High`, `Low`" in text


def test_crd_has_the_serving_mode_enum_defaulting_to_disaggregated() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "examples" / "opt-13b-a100x4.yaml").read_text())
    validator = _spec_validator()
    doc["spec"]["serving"] = {"mode": "Colocated"}
    assert not list(validator.iter_errors(doc))
    doc["spec"]["serving"] = {"mode": "Sometimes"}
    assert any("Sometimes" in e.message for e in validator.iter_errors(doc))
    serving = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["serving"]["properties"]["mode"]
    assert serving["enum"] == ["Auto", "Disaggregated", "Colocated"] and serving["default"] == "Disaggregated"
