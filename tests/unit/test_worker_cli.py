"""`distserve worker ...` flags, environment and the mounted plan file become typed settings."""

import argparse
import json

import pytest

from distserve_worker import cli_worker
from distserve_worker.settings import DecodeSettings, PrefillSettings, RouterSettings


def parse(argv, monkeypatch=None, env=None):
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    cli_worker.add_arguments(parser)
    return cli_worker.build_settings(parser.parse_args(argv))


def _phase(replicas, grpc_port, rank_port_base):
    return {
        "tp": 1,
        "pp": 1,
        "replicas": replicas,
        "stages": [{"stage": 0, "layers": {"start": 0, "end": 30}}],
        "grpcPort": grpc_port,
        "metricsPort": 9090,
        "rankPortBase": rank_port_base,
    }


def test_plan_file_gives_model_slo_and_limits(tmp_path):
    # The runtime contract as the operator writes it into the plan ConfigMap (api.RuntimeContract).
    plan = {
        "version": "distserve.io/runtime/v1",
        "model": {
            "name": "org/m",
            "source": {"kind": "PVC", "claimName": "weights", "path": "m", "ggufFile": "m.gguf"},
            "dtype": "bfloat16",
        },
        "slo": {"ttftMillis": 250, "tpotMillis": 100, "attainmentPercent": 90},
        "shape": {"layers": 30, "heads": 9, "kvHeads": 3},
        "prefill": _phase(2, 50051, 51051),
        "decode": _phase(1, 50051, 51067),
        "limits": {"prefillTokenBudget": 1024, "decodeMaxBatch": 8, "decodeKvTokens": 4096},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    prefill = parse(["prefill", "--plan-file", str(path)])
    assert isinstance(prefill, PrefillSettings) and prefill.token_budget == 1024
    decode = parse(["decode", "--plan-file", str(path)])
    assert isinstance(decode, DecodeSettings) and (decode.max_batch, decode.max_kv_tokens) == (8, 4096)
    router = parse(["router", "--plan-file", str(path), "--prefill-dns", "x-prefill.ns.svc"])
    assert isinstance(router, RouterSettings)
    assert (router.model.name, router.model.kind, router.model.gguf_file, router.model.dtype) == (
        "org/m",
        "PVC",
        "m.gguf",
        "bfloat16",
    )
    assert (router.slo_ttft_seconds, router.slo_tpot_seconds) == (0.25, 0.1)
    assert (router.prefill_dns, router.prefill_port, router.decode_port) == ("x-prefill.ns.svc", 50051, 50052)


def test_defaults_and_environment(monkeypatch):
    prefill = parse(
        ["prefill"], monkeypatch, {"DISTSERVE_KV_BUFFER_MIB": "8", "DISTSERVE_ADVERTISE": "10.0.0.5:50051"}
    )
    assert isinstance(prefill, PrefillSettings)
    assert (prefill.port, prefill.http_port, prefill.kv_buffer_bytes) == (50051, 8081, 8 * 1024 * 1024)
    assert prefill.address == "10.0.0.5:50051"
    decode = parse(["decode", "--max-batch", "4"])
    assert isinstance(decode, DecodeSettings) and (decode.port, decode.http_port, decode.max_batch) == (
        50052,
        8082,
        4,
    )


def test_router_overload_flags_and_environment(monkeypatch, capsys):
    router = parse(["router"])
    assert isinstance(router, RouterSettings)
    assert (router.max_queue, router.queue_timeout_seconds) == (128, 30.0)
    router = parse(["router", "--max-queue", "0"], monkeypatch, {"DISTSERVE_QUEUE_TIMEOUT_SECONDS": "5"})
    assert isinstance(router, RouterSettings)
    assert (router.max_queue, router.queue_timeout_seconds) == (0, 5.0)
    with pytest.raises(SystemExit):
        parse(["router", "--max-queue", "-1"])
    assert "--max-queue: -1 is below 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["router", "--queue-timeout-seconds", "soon"])
    assert "'soon' is not an integer" in capsys.readouterr().err


def test_drain_budget_from_flag_or_environment(monkeypatch):
    assert parse(["decode"]).drain_seconds == 30
    assert parse(["prefill", "--drain-seconds", "12.5"]).drain_seconds == 12.5
    env = {"DISTSERVE_DRAIN_SECONDS": "0"}  # 0: SIGTERM stops at once
    assert parse(["decode"], monkeypatch, env).drain_seconds == 0
    with pytest.raises(cli_worker.ContractError, match="--drain-seconds -1: use 0"):
        parse(["decode", "--drain-seconds", "-1"])
