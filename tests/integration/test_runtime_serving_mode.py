"""`distserve up` honours spec.serving.mode: Colocated runs colocated processes (each both phases)
with the planned shape, from the plan file, behind the same router and OpenAI endpoint."""

from __future__ import annotations

import aiohttp

from distserve_worker.contract import load_contract
from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import free_port
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import greedy_body, save_tiny_model, tiny_model, tiny_prompts
from distserve_worker.testing.up import distserve_up, tiny_manifest

MAX_TOKENS = 8


async def test_up_in_colocated_mode_serves_reference_tokens_from_colocated_processes(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "model")
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(tiny_manifest("tiny", model_dir, mode="Colocated"))
    prompt = tiny_prompts()[4]
    reference = reference_greedy(tiny_model("llama"), prompt, MAX_TOKENS, eos={0})
    logs, port = tmp_path / "logs", free_port()
    with distserve_up(manifest, port, logs) as url:
        body = greedy_body("tiny-llama", prompt, MAX_TOKENS)
        async with aiohttp.ClientSession() as session:
            whole = await complete(session, f"{url}/v1/completions", body, timeout=60)
            streamed = await complete(session, f"{url}/v1/completions", body | {"stream": True}, timeout=60)
            async with session.get(f"{url}/v1/distserve/instances") as response:
                listed = (await response.json())["instances"]
        contract = load_contract(logs / "plan.json")
    assert whole.status == 200 and whole.token_ids == reference
    assert streamed.status == 200 and streamed.error is None and streamed.text == whole.text
    assert streamed.chunks == len(reference)
    # What ran is the plan: one colocated TP1xPP1 process, listed to the router as both roles.
    assert contract.mode.value == "Colocated" and contract.colocated is not None
    assert (contract.colocated.tp, contract.colocated.pp) == (1, 1)
    assert sorted(p.name for p in logs.glob("*.log")) == ["colocated-0.log", "router.log"]
    assert {i["role"] for i in listed} == {"prefill", "decode"}
    assert len({i["address"] for i in listed}) == 1
