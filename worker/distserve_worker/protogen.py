"""Generate (or check) the Python code for the .proto files under protos/.

`make protos` runs `python -m distserve_worker.protogen write`; `make check-protos` runs `... check`,
which regenerates into a temporary directory and fails, naming the files, when the committed code
differs from what the .proto files produce (someone edited a .proto and forgot `make protos`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# The generated files sit beside their .proto; these are all of them.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def protos_root() -> Path:
    """The `protos/` source root of this checkout (generation needs the sources, not an installed copy)."""
    return Path(__file__).resolve().parents[2] / "protos"


def proto_files(root: Path) -> list[Path]:
    return sorted(root.glob("distserve_protos/**/*.proto"))


def generate(root: Path, out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto under root; return the generated files' paths."""
    from grpc_tools import protoc  # dev dependency; imported here so the runtime never needs it

    protos = proto_files(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(root)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see above)")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("distserve_protos/**/*") if p.name.endswith(GENERATED_SUFFIXES))


def write(root: Path) -> list[Path]:
    written = generate(root, root)
    for path in written:
        # Each generated package directory needs an __init__.py to be importable as a regular package.
        for parent in path.relative_to(root).parents:
            if str(parent) != ".":
                init = root / parent / "__init__.py"
                if not init.exists():
                    init.write_text("")
    return written


def stale_files(root: Path) -> list[str]:
    """Relative paths whose committed bytes differ from freshly generated ones (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        fresh = {p.relative_to(fresh_dir).as_posix(): p.read_bytes() for p in generate(root, fresh_dir)}
    have = {p.relative_to(root).as_posix(): p.read_bytes() for p in committed(root)}
    return sorted(name for name in fresh.keys() | have.keys() if fresh.get(name) != have.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distserve_worker.protogen", description=__doc__)
    parser.add_argument("action", choices=["write", "check"])
    args = parser.parse_args(argv)
    root = protos_root()
    if args.action == "write":
        for path in write(root):
            print(f"wrote {path.relative_to(root.parent)}")
        return 0
    stale = stale_files(root)
    if stale:
        print(
            "generated protobuf code is stale (run `make protos` and commit the result):\n  "
            + "\n  ".join(stale),
            file=sys.stderr,
        )
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
