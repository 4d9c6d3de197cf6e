"""`distserve up` runs the plan: the plan becomes a runtime contract (plan.json) that every local
process starts with; plans that cannot run here are refused with the fix. No processes started."""

import argparse
import dataclasses
import json

import pytest

from distserve_operator import api
from distserve_worker import cli_worker
from distserve_worker.contract import load_contract
from distserve_worker.local import cli_up
from distserve_worker.local.cli_up import (
    LocalPlan,
    PlanNotRunnable,
    build_contract,
    plan_manifest,
    start_stack,
)
from distserve_worker.local.stack import LocalStack, StackConfig, write_plan
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.tiny import save_tiny_model
from distserve_worker.testing.up import tiny_manifest


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))  # 2 layers, 4 heads, 2 KV heads


def manifest(directory, model_dir, name="tiny"):
    path = directory / "tiny.yaml"
    path.write_text(tiny_manifest(name, model_dir, gpus_per_node=2))
    return path


def local_plan(model_dir, prefill=(1, 1, 1), decode=(1, 1, 1)):
    """LocalPlan with (tp, pp, replicas) per role, as plan_manifest builds it."""
    return LocalPlan(
        "tiny",
        ModelSpec("tiny-llama", "Path", str(model_dir)),
        prefill[2],
        decode[2],
        (1000, 200),
        90.0,
        "",
        prefill_tp=prefill[0],
        decode_tp=decode[0],
        prefill_pp=prefill[1],
        decode_pp=decode[1],
        api_model=api.ModelSpec(
            name="tiny-llama", source={"kind": "Path", "path": str(model_dir)}, dtype="float32"
        ),
        api_slo=api.Slo(ttft_millis=1000, tpot_millis=200),
    )


def settings_of(args):
    parser = argparse.ArgumentParser()
    cli_worker.add_arguments(parser)
    return cli_worker.build_settings(parser.parse_args(args))


def test_up_writes_the_plan_as_a_contract_and_every_process_obeys_it(tmp_path, tiny_llama):
    plan = plan_manifest(manifest(tmp_path, tiny_llama))
    stack = start_stack(plan, port=0, max_replicas=1, threads=1, log_dir=str(tmp_path / "logs"))
    assert stack.config.plan_file == tmp_path / "logs" / "plan.json"
    contract = load_contract(stack.config.plan_file)
    assert contract.shape == api.ModelShape(layers=2, heads=4, kv_heads=2)
    assert (contract.prefill.tp, contract.decode.tp) == (plan.prefill_tp, plan.decode_tp)
    assert contract.prefill.stages[0].layers == api.LayerRange(start=0, end=2)
    # The limits the planner simulated (PlanStatus.limits) are what the workers run.
    assert contract.limits == plan.limits == (plan.status.limits or api.EngineLimits())
    assert contract.plan == plan.status
    for proc in stack.procs:
        assert proc.args[proc.args.index("--plan-file") + 1] == str(stack.config.plan_file)
        assert "--model-name" not in proc.args
        settings = settings_of(proc.args)
        assert settings.model.path == str(tiny_llama)
        if proc.name != "router":
            assert proc.args[proc.args.index("--rank-port-base") + 1] == "0"
            assert (settings.tp, settings.layers, settings.rank_port_base) == (1, (0, 2), 0)


def test_up_passes_the_api_key_file_to_the_router_only(tmp_path, tiny_llama):
    keys = tmp_path / "keys"
    keys.write_text("sk-local\n")
    plan = plan_manifest(manifest(tmp_path, tiny_llama))
    stack = start_stack(
        plan, port=0, max_replicas=1, threads=1, log_dir=str(tmp_path / "logs"), api_key_file=str(keys)
    )
    router = stack.proc("router").args
    assert router[router.index("--api-key-file") + 1] == str(keys.resolve())
    assert settings_of(router).api_key_file == str(keys.resolve())
    assert all("--api-key-file" not in p.args for p in stack.procs if p.name != "router")
    with pytest.raises(OSError, match="no such file"):
        start_stack(plan, port=0, max_replicas=1, threads=1, api_key_file=str(tmp_path / "absent"))


def test_the_plans_tp_runs_and_replicas_are_capped(tmp_path, tiny_llama, capsys):
    plan = local_plan(tiny_llama, prefill=(2, 1, 3), decode=(1, 1, 2))
    stack = start_stack(plan, port=0, max_replicas=2, threads=1, log_dir=str(tmp_path))
    assert "running 2 + 2 here" in capsys.readouterr().out
    assert [p.name for p in stack.procs] == ["prefill-0", "prefill-1", "decode-0", "decode-1", "router"]
    contract = load_contract(stack.config.plan_file)
    assert (contract.prefill.tp, contract.prefill.replicas, contract.decode.tp, contract.decode.replicas) == (
        2,
        2,
        1,
        2,
    )
    prefill = settings_of(stack.proc("prefill-0").args)
    assert (prefill.tp, prefill.decode_tp) == (2, 1)


def test_limits_come_from_the_plan_or_default(tiny_llama):
    assert build_contract(local_plan(tiny_llama), 1, 1).limits == api.EngineLimits()
    mine = api.EngineLimits(decode_max_batch=7)
    planned = dataclasses.replace(local_plan(tiny_llama), limits=mine)
    assert build_contract(planned, 1, 1).limits == mine


def test_a_plan_with_pipeline_stages_runs_one_process_per_stage(tmp_path, tiny_llama):
    contract = build_contract(local_plan(tiny_llama, prefill=(1, 2, 1), decode=(1, 2, 1)), 1, 1)
    assert [(s.layers.start, s.layers.end) for s in contract.decode.stages] == [(0, 1), (1, 2)]
    stack = LocalStack(StackConfig(ModelSpec(), plan_file=write_plan(contract, tmp_path), log_dir=tmp_path))
    names = [p.name for p in stack.procs]
    assert names == ["prefill-0", "prefill-0-s1", "decode-0", "decode-0-s1", "router"]
    for role in ("prefill", "decode"):
        first, second = stack.proc(f"{role}-0"), stack.proc(f"{role}-0-s1")
        chain = first.args[first.args.index("--stage-addresses") + 1].split(",")
        assert second.args[second.args.index("--stage-addresses") + 1].split(",") == chain
        assert (
            first.args[first.args.index("--stage") + 1],
            second.args[second.args.index("--stage") + 1],
        ) == ("0", "1")
        # The router calls stage 0 only.
        assert (stack.prefill_addresses if role == "prefill" else stack.decode_addresses) == [chain[0]]


def test_a_tp_that_does_not_divide_the_heads_is_refused(tiny_llama):
    with pytest.raises(PlanNotRunnable, match=r"prefill\.tp.*divide.*spec\.planner\.pin"):
        build_contract(local_plan(tiny_llama, prefill=(3, 1, 1)), 1, 1)


def test_up_stops_with_the_reason_when_the_plan_cannot_run(tmp_path, tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(cli_up, "plan_manifest", lambda _: local_plan(tiny_llama, prefill=(1, 4, 1)))
    args = argparse.Namespace(
        file="x.yaml", port=0, max_replicas=1, threads=1, log_dir=str(tmp_path), api_key_file=""
    )
    assert cli_up.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "distserve up: the plan cannot run on tiny-llama: pp 4 is more than the model's 2 layers"
    )
    assert "spec.planner.pin" in err


def test_stack_config_from_a_plan_file(tmp_path, tiny_llama):
    contract = build_contract(local_plan(tiny_llama, prefill=(1, 1, 3), decode=(2, 1, 1)), 3, 1)
    path = write_plan(contract, tmp_path)
    assert json.loads(path.read_text())["version"] == api.CONTRACT_VERSION
    config = StackConfig.from_plan_file(path, max_replicas=2, threads=1)
    assert (config.prefill, config.decode, config.plan_file, config.threads) == (2, 1, path, 1)
    assert config.model == ModelSpec("tiny-llama", "Path", str(tiny_llama))
    assert StackConfig.from_plan_file(path).prefill == 3


def test_plan_flags_are_refused_with_a_plan_file_but_pass_through_without_one(tmp_path, tiny_llama):
    path = write_plan(build_contract(local_plan(tiny_llama), 1, 1), tmp_path)
    with pytest.raises(ValueError, match="--tp"):
        LocalStack(StackConfig(ModelSpec(), plan_file=path, prefill_args=["--tp", "2"], log_dir=tmp_path))
    model = ModelSpec("tiny-llama", "Path", str(tiny_llama))
    stack = LocalStack(
        StackConfig(
            model, prefill_args=["--tp", "2", "--decode-tp", "2"], decode_args=["--tp", "2"], log_dir=tmp_path
        )
    )
    assert stack.plan_file is None
    prefill, decode = settings_of(stack.proc("prefill-0").args), settings_of(stack.proc("decode-0").args)
    assert (prefill.tp, prefill.decode_tp, decode.tp) == (2, 2, 2)
    assert prefill.model == model


def test_up_in_colocated_mode_runs_colocated_processes_with_the_planned_limits(tmp_path, tiny_llama):
    from distserve_worker.colocated import ColocatedSettings

    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_manifest("tiny", tiny_llama, gpus_per_node=2, mode="Colocated"))
    plan = plan_manifest(path)
    assert plan.status.mode is api.PlanMode.COLOCATED and plan.colocated >= 1
    stack = start_stack(plan, port=0, max_replicas=1, threads=1, log_dir=str(tmp_path / "logs"))
    assert [p.name for p in stack.procs] == ["colocated-0", "router"]
    router = stack.proc("router").args
    address = router[router.index("--prefill") + 1]
    assert router[router.index("--decode") + 1] == address  # the one instance is both, to the router
    contract = load_contract(stack.config.plan_file)
    assert contract.colocated is not None and contract.colocated.replicas == 1
    settings = settings_of(stack.proc("colocated-0").args)
    assert isinstance(settings, ColocatedSettings)
    limits = plan.status.colocated.limits
    assert (settings.prefill.token_budget, settings.decode.max_batch, settings.decode.max_kv_tokens) == (
        limits.prefill_token_budget,
        limits.decode_max_batch,
        limits.decode_kv_tokens,
    )


def test_colocated_worker_refuses_a_plan_shape_it_cannot_run(tmp_path, tiny_llama):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_manifest("tiny", tiny_llama, gpus_per_node=2, mode="Colocated"))
    plan = plan_manifest(path)
    contract = build_contract(plan, 1, 1, colocated=1)
    wide = contract.model_copy(update={"colocated": contract.colocated.model_copy(update={"tp": 2})})
    plan_file = write_plan(wide, tmp_path)
    with pytest.raises(cli_worker.ContractError, match=r"colocated is TP2xPP1.*TP1xPP1 only.*Disaggregated"):
        settings_of(["colocated", "--plan-file", str(plan_file)])
