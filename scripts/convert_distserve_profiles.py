"""Convert the DistServe paper's A100-80GB latency profiles into distserve-profile/v1 files that ship
with the planner (`spec.planner.profile: NAME`, `distserve plan --profile NAME`).

    python scripts/convert_distserve_profiles.py write   # regenerate the bundled profiles
    python scripts/convert_distserve_profiles.py check   # exit 1 when they differ from a fresh conversion

Reads DistServe's profiler files from ../shared/data/distserve-a100 (or --source DIR, or
$DISTSERVE_SHARED/data/distserve-a100) and writes one profile per model and engine, each with its
provenance inside, into operator/distserve_planner/bundled_profiles/ (package data: the wheel and the
operator image carry them) and the same bytes into deploy/profiles/ (for people reading the repo).

The source files must be byte for byte the ones at the commit recorded below (SHA-256 checked):
the provenance says that commit, so a different source is refused rather than mislabelled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from distserve_planner import profiles

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTSERVE_SHARED", ROOT.parent / "shared")) / "data" / "distserve-a100"
OUTPUTS = (ROOT / "operator" / "distserve_planner" / "bundled_profiles", ROOT / "deploy" / "profiles")

REPOSITORY = "https://github.com/LLMServe/DistServe"
LICENSE = "Apache-2.0"
COPYRIGHT = "Copyright 2024 DistServe Authors"
SOURCE_DIR = "simdistserve/estimators/profile_data"
# file -> (engine suffix of our names, what it profiles, commit holding exactly these bytes, SHA-256)
SOURCES = {
    "profiler-a100-80g.distserve.json": (
        "distserve",
        "DistServe's own engine",
        "f06659fe5636654c97af11f5d7862105e4360187",
        "f5daa7346d6c0e3a69a830ac4ece11432891e09d610bcf3125d916c48b31f512",
    ),
    "profiler-a100-80g.vllm.json": (
        "vllm",
        "vLLM (the paper's colocated baseline)",
        "f06659fe5636654c97af11f5d7862105e4360187",
        "ab24e00e0e1165fc45c9fbaeaa36aeb1f67cfe21d3961cb995b385a31c95f751",
    ),
}
MODELS = {"facebook/opt-13b": "opt-13b", "facebook/opt-66b": "opt-66b"}
DEVICE = "A100-80GB"


def bundled_name(model: str, engine: str) -> str:
    return f"{MODELS[model]}-{DEVICE.lower()}-{engine}"


def convert(source: Path) -> dict[str, str]:
    """File name -> the profile's text, for every model of every source file."""
    out: dict[str, str] = {}
    for filename, (engine, what, commit, sha256) in SOURCES.items():
        raw = (source / filename).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise SystemExit(
                f"{source / filename}: SHA-256 {digest} is not that of {SOURCE_DIR}/{filename} at "
                f"{REPOSITORY} commit {commit} ({sha256}); fix: use that file, or find the commit "
                "holding this one and update SOURCES"
            )
        data = json.loads(raw)
        for model in MODELS:
            imported = profiles.import_distserve(data, model)
            conversion = (
                f"{model} from {filename} ({what}): for each TP, prefill -> prefill (a + b*tokens + "
                "c*sum(len^2), ms), decoding_smallbs -> decode_small and decoding_largebs -> "
                "decode_large (a + b*context_tokens + c*batch, ms), "
                "decoding_large_small_bs_threshold -> decode_threshold (decode_large from that batch "
                "size on, as DistServe's simulator switches at batch >= threshold); figures unchanged; "
                "every entry PP1 (the planner models pipeline stages on top, as DistServe's simulator "
                "does); batching packed (variable-length batches)"
            )
            profile = imported.model_copy(
                update={
                    "source": f"DistServe profiler, {what}",
                    "provenance": profiles.Provenance(
                        repository=REPOSITORY,
                        path=f"{SOURCE_DIR}/{filename}",
                        commit=commit,
                        license=LICENSE,
                        copyright=COPYRIGHT,
                        sha256=sha256,
                        converted_by="scripts/convert_distserve_profiles.py",
                        conversion=conversion,
                    ),
                }
            )
            text = json.dumps(profile.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
            out[f"{bundled_name(model, engine)}.json"] = text
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("--source", type=Path, default=SHARED, help="folder holding DistServe's files")
    args = parser.parse_args(argv)
    if not (args.source / next(iter(SOURCES))).is_file():
        print(f"DistServe's profiler files not found under {args.source}; pass --source DIR", file=sys.stderr)
        return 2
    fresh = convert(args.source)
    stale = []
    for folder in OUTPUTS:
        for name, text in fresh.items():
            path = folder / name
            if args.action == "write":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
            elif not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
    if stale:
        print("stale (run: python scripts/convert_distserve_profiles.py write): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
