"""Generate the CustomResourceDefinition from the pydantic models.

`python -m distserve_operator.api.crd write` regenerates the committed YAML in deploy/ and the
chart; `... check` fails (exit 1) when either is stale, naming the command that fixes it.

Kubernetes wants a *structural* schema: no `$ref`, no `type: null`, no `additionalProperties`
beside `properties`, no titles. This module rewrites pydantic's JSON Schema into that shape.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from .resource import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import DistServeDeploymentSpec
from .status import DistServeDeploymentStatus

CRD_PATHS = (
    Path("deploy/10-crd-distservedeployments.yaml"),
    Path("charts/distserve/crds/distserve.io_distservedeployments.yaml"),
)

_DROP = {"title", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP and k != "$defs"}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _structural(v) for k, v in node.items()}
    # Optional[X] arrives as anyOf [X, null]: keep X (optionality is "not in required").
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            merged = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
            node = merged
        else:
            node["anyOf"] = options
    # allOf [X] is how pydantic attaches a description to a referenced model.
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    if node.get("default", 0) is None:
        del node["default"]
    if "properties" in node:
        node.pop("additionalProperties", None)
        node.setdefault("type", "object")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    # JSON Schema's numeric exclusive bounds are OpenAPI 3.0's boolean flags beside minimum/maximum.
    for exclusive, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), int | float) and not isinstance(node[exclusive], bool):
            node[plain] = node.pop(exclusive)
            node[exclusive] = True
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("anyOf", None)
    return node


def schema_for(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})))  # type: ignore[no-any-return]


def build_crd() -> dict[str, Any]:
    spec_schema = schema_for(DistServeDeploymentSpec)
    status_schema = schema_for(DistServeDeploymentStatus)
    spec_schema["description"] = "What to serve, the SLOs, the expected workload and the cluster to plan for."
    status_schema["description"] = "The plan, conditions and observed workload (written by the operator)."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "distserve", "app.kubernetes.io/part-of": "distserve"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "distserve"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Plan", "type": "string", "jsonPath": ".status.plan.summary"},
                        {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Goodput/GPU",
                            "type": "number",
                            "jsonPath": ".status.plan.estimated.goodputPerGPU",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "A model served DistServe-style: prefill and decode on separate GPU instances, "
                                "sized by a goodput planner under TTFT/TPOT SLOs."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `make crds` from operator/distserve_operator/api; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=110)


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "check"
    text = render()
    if mode == "write":
        for path in CRD_PATHS:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    if mode == "check":
        stale = [str(p) for p in CRD_PATHS if not p.exists() or p.read_text() != text]
        if stale:
            print(
                f"CRD YAML is stale: {', '.join(stale)}. Run `make crds` and commit the result.",
                file=sys.stderr,
            )
            return 1
        print("CRD YAML is up to date")
        return 0
    print("usage: python -m distserve_operator.api.crd write|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
