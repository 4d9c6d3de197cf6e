"""A worker refuses a plan file it cannot obey before loading anything: exit status 2 and one line
naming the field and the fix (the real CLI entry point, a real model config on disk)."""

from __future__ import annotations

import json

import pytest

from distserve_operator import api
from distserve_worker import cli_worker
from distserve_worker.contract import load_contract
from distserve_worker.testing.tiny import save_tiny_model

LAYERS, HEADS, KV_HEADS = 2, 4, 2  # the tiny Llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny"))


def contract(tiny_dir, prefill_tp=1, decode_tp=1, layers=LAYERS, pp=1, shape=True) -> dict:
    model = api.ModelSpec(name="tiny", source={"kind": "Path", "path": str(tiny_dir)}, dtype="float32")
    doc = api.RuntimeContract(
        model=model,
        slo=api.Slo(ttft_millis=1000, tpot_millis=200),
        shape=api.ModelShape(layers=layers, heads=HEADS, kv_heads=KV_HEADS) if shape else None,
        prefill=api.phase_contract("prefill", prefill_tp, pp, 1, layers, 50051, 9090),
        decode=api.phase_contract("decode", decode_tp, pp, 1, layers, 50052, 9091),
    )
    return doc.to_wire()


def run(tmp_path, doc, *argv, capsys) -> tuple[int, str]:
    path = tmp_path / "plan.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    code = cli_worker.main([*argv, "--plan-file", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_not_json(tmp_path, capsys):
    code, err = run(tmp_path, "{not json", "decode", capsys=capsys)
    assert code == 2 and "not JSON" in err and len(err.splitlines()) == 1


def test_old_format_names_the_missing_field(tmp_path, capsys):
    code, err = run(
        tmp_path,
        {"model": {"name": "x"}, "slo": {"ttftMillis": 1, "tpotMillis": 1}},
        "prefill",
        capsys=capsys,
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "prefill: Field required" in err and "re-render it" in err


def test_tp_that_does_not_divide_the_heads_is_refused_by_the_contract(tmp_path, capsys):
    doc = contract(tmp_path)  # shape says 4 heads
    doc["decode"]["tp"] = 3
    code, err = run(tmp_path, doc, "decode", capsys=capsys)
    assert code == 2 and "decode.tp: TP3 does not divide the model's 4 attention heads" in err


def test_tp_that_does_not_divide_the_loaded_models_heads_is_refused_before_loading(
    tiny_dir, tmp_path, capsys
):
    doc = contract(tiny_dir, shape=False)  # the plan knew no shape: the model's own config decides
    doc["decode"]["tp"] = 3
    code, err = run(tmp_path, doc, "decode", capsys=capsys)
    assert code == 2 and "decode.tp: TP3 does not divide the model's 4 attention heads" in err


def test_layer_range_outside_the_model(tiny_dir, tmp_path, capsys):
    doc = contract(tiny_dir, layers=30, shape=False)
    code, err = run(tmp_path, doc, "prefill", capsys=capsys)
    assert code == 2 and "cover 30 layers but the model has 2" in err and "architecture.layers" in err


def test_stage_outside_pp(tiny_dir, tmp_path, capsys):
    code, err = run(tmp_path, contract(tiny_dir), "decode", "--stage", "1", capsys=capsys)
    assert code == 2 and "--stage 1 (DISTSERVE_STAGE) is outside decode.pp 1" in err


def test_flags_that_contradict_the_plan_file(tiny_dir, tmp_path, capsys):
    code, err = run(tmp_path, contract(tiny_dir), "decode", "--max-batch", "4", capsys=capsys)
    assert code == 2 and "--max-batch given together with --plan-file" in err


def test_tensor_parallelism_of_an_unsupported_family(tmp_path, capsys):
    opt = save_tiny_model("opt", tmp_path / "opt")
    doc = contract(opt, shape=False)
    doc["decode"]["tp"] = 2
    code, err = run(tmp_path, doc, "decode", capsys=capsys)
    assert code == 2 and "supports llama, mistral, qwen2 models; this one is 'opt'" in err


def test_a_good_contract_is_obeyed(tiny_dir, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(contract(tiny_dir, prefill_tp=2, decode_tp=2)))
    parser = cli_worker.argparse.ArgumentParser()
    cli_worker.add_arguments(parser)
    settings = cli_worker.build_settings(parser.parse_args(["prefill", "--plan-file", str(path)]))
    assert (settings.tp, settings.decode_tp, settings.layers) == (2, 2, (0, LAYERS))
    assert settings.rank_port_base == api.rank_port_base(50051, "prefill")
    cli_worker.check_model(settings, load_contract(path))  # fits the model: no error
