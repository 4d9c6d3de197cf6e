"""Starts router, prefill and decode instances as separate local processes, and stops them.

Each process is `python -m distserve_worker.cli_worker ROLE ...` on loopback with free ports,
in its own process group (so a Ctrl-C in the terminal reaches only this supervisor, which then
stops the children in order) with its output in a log file. Tests, benchmarks, `distserve up` and
`distserve demo` all use this one class.

Two ways to say what the workers run:

- flags: `StackConfig(model, prefill_args=["--tp", "2"], ...)`: the model flags from `model`, and
  per-role extra flags passed through as they are;
- a runtime contract: `StackConfig(..., plan_file=PATH)` or `StackConfig.from_plan_file(PATH)`:
  every process starts with `--plan-file PATH` (model, SLO, tp, layers and engine limits from it,
  exactly as in a pod) and tensor-parallel follower ranks take free ports (`--rank-port-base 0`).
  `write_plan(contract, directory)` writes a `RuntimeContract` where a stack can read it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distserve_worker.model_source import ModelSpec

if TYPE_CHECKING:
    from distserve_operator.api import RuntimeContract

PLAN_FILE_NAME = "plan.json"
# Flags the plan file sets: a worker refuses them together with --plan-file (cli_worker.obey).
PLAN_FLAGS = ("--tp", "--decode-tp", "--token-budget", "--max-batch", "--max-kv-tokens")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere a guess


_HANDED_OUT: set[int] = set()  # ports free_port returned in this process: never twice


def free_port() -> int:
    """A free port for a process this stack starts later, below the kernel's ephemeral range.

    Sockets that bind port 0 (tensor-parallel follower ranks, every client connection) get ports
    from that range, so they never take a port handed out here but not bound yet; a port the OS
    picked for us from the same range could be, and two servers would then share it."""
    floor = _ephemeral_floor()
    low, high = max(1024, floor - 16384), floor - 1
    for _ in range(100 if high - low > 1000 else 0):
        port = random.randint(low, high)
        if port in _HANDED_OUT:  # free now, but promised to a process not started yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    args: list[str]
    http_port: int  # where /readyz answers
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class StackConfig:
    model: ModelSpec
    prefill: int = 1
    decode: int = 1
    # >0: the colocated baseline instead: this many processes each doing both phases
    # (`distserve worker colocated`), listed to the router as prefill and as decode instances.
    colocated: int = 0
    threads: int = 0  # torch threads per worker; 0 = half the cores each
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    router_port: int = 0  # 0 = a free port
    log_dir: Path | None = None
    slo_millis: tuple[int, int] | None = None  # (TTFT, TPOT)
    # A runtime contract (plan.json) every process starts with instead of the model flags; its
    # per-role extra args must then not repeat what it sets (PLAN_FLAGS).
    plan_file: Path | str | None = None

    @classmethod
    def from_plan_file(
        cls, plan_file: Path | str, max_replicas: int | None = None, **overrides: Any
    ) -> StackConfig:
        """A stack that runs the contract: its model, and its replica counts (capped at max_replicas,
        at least one each). `overrides` are any other StackConfig fields."""
        from distserve_worker.contract import load_contract

        contract = load_contract(plan_file)
        cap = (
            max_replicas
            if max_replicas is not None
            else max(contract.prefill.replicas, contract.decode.replicas, 1)
        )
        fields: dict[str, Any] = {
            "model": ModelSpec.from_plan_json(contract.model.to_wire()),
            "prefill": max(1, min(contract.prefill.replicas, cap)),
            "decode": max(1, min(contract.decode.replicas, cap)),
            "plan_file": Path(plan_file),
        }
        if contract.colocated is not None:  # mode Colocated: processes doing both phases
            fields["colocated"] = max(1, min(contract.colocated.replicas, cap))
        return cls(**(fields | overrides))


def write_plan(contract: RuntimeContract, directory: Path | str, name: str = PLAN_FILE_NAME) -> Path:
    """Write a runtime contract as the plan ConfigMap's plan.json would hold it; returns its path."""
    import json

    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(contract.to_wire(), indent=2) + "\n")
    return path.resolve()


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="distserve-"))
        self.procs: list[Proc] = []
        threads = config.threads or max(1, (os.cpu_count() or 2) // 2)
        self.plan_file = Path(config.plan_file).resolve() if config.plan_file else None
        if self.plan_file is not None:
            clashes = sorted(
                {a.split("=")[0] for a in config.prefill_args + config.decode_args} & set(PLAN_FLAGS)
            )
            if clashes:
                raise ValueError(
                    f"{', '.join(clashes)} in the per-role args together with plan_file: the plan file "
                    "sets them; change the plan instead"
                )
            model_args = ["--plan-file", str(self.plan_file)]
        else:
            model = config.model
            model_args = ["--model-name", model.name, "--model-source", model.kind, "--dtype", model.dtype]
            if model.path:
                model_args += ["--model-path", model.path]
            if model.gguf_file:
                model_args += ["--gguf-file", model.gguf_file]
        common = [*model_args, "--host", "127.0.0.1", "--threads", str(threads)]
        self.prefill_addresses: list[str] = []
        self.decode_addresses: list[str] = []
        if config.colocated:
            both = config.prefill_args + config.decode_args
            roles = [("colocated", config.colocated, both, self.prefill_addresses)]
        else:
            roles = [
                ("prefill", config.prefill, config.prefill_args, self.prefill_addresses),
                ("decode", config.decode, config.decode_args, self.decode_addresses),
            ]
        stages = self._stages()
        for role, count, extra, addresses in roles:
            for index in range(count):
                # An instance with pipeline stages is one process per stage; the router calls stage 0.
                pp = stages.get(role, 1)
                ports = [free_port() for _ in range(pp)]
                chain = ",".join(f"127.0.0.1:{p}" for p in ports)
                addresses.append(f"127.0.0.1:{ports[0]}")
                for stage, port in enumerate(ports):
                    http_port = free_port()
                    args = [role, *common, "--port", str(port), "--http-port", str(http_port)]
                    if role != "colocated":
                        args += ["--rank-port-base", "0"]  # tensor-parallel follower ranks: free ports
                    if pp > 1:
                        args += ["--stage", str(stage), "--stage-addresses", chain]
                    args += extra
                    name = f"{role}-{index}" + (f"-s{stage}" if stage else "")
                    self.procs.append(Proc(name, args, http_port, self.log_dir / f"{name}.log"))
        if config.colocated:
            self.decode_addresses.extend(self.prefill_addresses)
        self.router_port = config.router_port or free_port()
        router = ["router", *model_args, "--host", "127.0.0.1", "--port", str(self.router_port)]
        router += ["--prefill", ",".join(self.prefill_addresses), "--decode", ",".join(self.decode_addresses)]
        if config.slo_millis:
            router += [
                "--slo-ttft-millis",
                str(config.slo_millis[0]),
                "--slo-tpot-millis",
                str(config.slo_millis[1]),
            ]
        self.procs.append(
            Proc("router", [*router, *config.router_args], self.router_port, self.log_dir / "router.log")
        )

    def _stages(self) -> dict[str, int]:
        """Pipeline stages per role, from the plan file (one each without one)."""
        if self.plan_file is None:
            return {}
        from distserve_worker.contract import load_contract

        contract = load_contract(self.plan_file)
        return {"prefill": contract.prefill.pp, "decode": contract.decode.pp}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def start(self) -> None:
        for proc in self.procs:
            self._spawn(proc)

    def _spawn(self, proc: Proc) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with proc.log.open("ab") as log:
            proc.popen = subprocess.Popen(
                [sys.executable, "-m", "distserve_worker.cli_worker", *proc.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C goes to the supervisor, which stops children in order
            )

    def wait_ready(self, timeout: float = 300.0, names: list[str] | None = None) -> None:
        """Until every process (or those named) answers /readyz; raises with its log if one dies."""
        deadline = time.monotonic() + timeout
        pending = [p for p in self.procs if names is None or p.name in names]
        while pending:
            for proc in list(pending):
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
                if _ready(proc.http_port):
                    pending.remove(proc)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(p.name for p in pending)}")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one process (fault tests): no clean shutdown, exactly like a crashed pod."""
        proc = self.proc(name)
        if proc.popen and proc.alive():
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
            # Its rank or stage children hold inherited sockets until they are gone too: a restart
            # on the same ports before then fails to bind.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.popen.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def terminate(self, name: str) -> None:
        """SIGTERM one process, as the kubelet does to a pod going away (scale-down, rollout): a
        worker drains (refuses new requests, finishes what it holds) and exits by itself."""
        proc = self.proc(name)
        if proc.popen and proc.alive():
            os.killpg(proc.popen.pid, signal.SIGTERM)

    def restart(self, *names: str, timeout: float = 120.0) -> None:
        """Kill (if alive) and start again each named process, all at once; until they are ready."""
        for name in names:
            self.kill(name)
            self._spawn(self.proc(name))
        self.wait_ready(timeout, list(names))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everything (router first, so no new work reaches the workers): each worker
        drains what it holds and exits, at once when idle. Once no router or decode process is
        left, nothing can pull what a prefill process still holds, so a second SIGTERM stops those
        at once. SIGKILL for stragglers."""
        deadline = time.monotonic() + timeout
        self._signal(reversed(self.procs), signal.SIGTERM)
        holders = [p for p in self.procs if p.name.startswith("prefill-")]
        self._wait([p for p in self.procs if p not in holders], deadline)
        self._signal(holders, signal.SIGTERM)
        self._wait(self.procs, deadline)

    @staticmethod
    def _signal(procs: Iterable[Proc], sig: signal.Signals) -> None:
        for proc in procs:
            if proc.popen and proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, sig)

    @staticmethod
    def _wait(procs: Iterable[Proc], deadline: float) -> None:
        """Until each has exited; SIGKILL for those still there at the deadline."""
        for proc in procs:
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
