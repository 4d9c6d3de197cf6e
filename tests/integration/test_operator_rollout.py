"""Changing a running deployment without losing serving capacity: the real operator against the
emulator, with a test controller playing the StatefulSet controller and the kubelet (pods turn
Ready after a delay, and take a while to drain when scaled down)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.controllers import StatefulSetController, names
from operator_support.harness import NS, eventually, operator_env
from operator_support.manifests import dsd
from operator_support.planners import plan_fn

# SmolLM2 has 9 attention heads: TP1 and TP3 split them.
PIN_A = {"prefill": {"tp": 1, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 1, "replicas": 2}}
PIN_B = {"prefill": {"tp": 3, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 2, "replicas": 2}}


def _revisions(env, name: str = "llm") -> set[str]:  # type: ignore[no-untyped-def]
    return set(names(env.api, NS, name).values())


async def test_a_staged_replan_never_leaves_a_role_without_a_ready_instance_and_resumes_after_a_restart() -> (
    None
):
    async with operator_env(plan_fn=plan_fn(), rollout_poll_seconds=0.3) as env:
        ctl = StatefulSetController(env.api, env.url, env.session, NS, ready_seconds=2.0, drain_seconds=0.5)
        async with ctl.running():
            await env.start_operator()
            await env.create(dsd("llm", planner={"pin": PIN_A}))
            await eventually(
                lambda: (env.condition("llm", "Ready") or {}).get("status") == "True", what="Ready"
            )
            (old,) = _revisions(env)
            start = len(ctl.history)

            # A changed pin changes the pods' shape: new groups come up beside the old ones.
            await env.patch_spec("llm", {"planner": {"pin": PIN_B}})
            both = await eventually(lambda: len(_revisions(env)) == 2 and _revisions(env), what="new groups")
            (new,) = both - {old}
            progressing = await eventually(
                lambda: (
                    (c := env.condition("llm", "Progressing"))
                    and c["reason"] == "StagedReplan"
                    and env.status("llm").get("rollout")
                    and c
                ),
                what="Progressing=StagedReplan",
            )
            assert progressing["status"] == "True"
            assert "decode TP1xPP1 ×2" in progressing["message"]  # the old plan
            assert "decode TP1xPP2" in progressing["message"]  # the new one
            rollout = env.status("llm")["rollout"]
            assert (rollout["oldRevision"], rollout["newRevision"]) == (old, new)
            assert rollout["step"] == "StartingNew"

            # The operator restarts mid-rollout (new groups not Ready yet): it resumes from what
            # the objects and status say.
            await env.stop_operator()
            assert len(_revisions(env)) == 2
            await env.start_operator()

            await eventually(lambda: _revisions(env) == {new}, timeout=30, what="the old groups gone")
            done = await eventually(
                lambda: (
                    "rollout" not in env.status("llm")
                    and (c := env.condition("llm", "Progressing"))
                    and c["status"] == "False"
                    and c
                ),
                what="the rollout to complete",
            )
            assert done["reason"] == "Stable"
            # Events are posted in the background (kopf's queue): they may trail the status.
            await eventually(
                lambda: any(e.get("reason") == "RolloutComplete" for e in env.events()),
                what="a RolloutComplete Event",
            )
            # The old revision's plan copy and stage Services went with it.
            assert not [
                c for c in env.children("v1/configmaps", "llm") if c["metadata"]["name"].endswith(old)
            ]
            assert not [s for s in env.children("v1/services", "llm") if old in s["metadata"]["name"]]

        # At no tick of the whole rollout did a role have zero ready instances.
        during = ctl.history[start:]
        assert len(during) > 20
        empty = [(t, r) for t, r in during if min(r.values()) == 0]
        assert not empty, empty[:3]


async def test_replicas_only_changes_scale_in_place() -> None:
    more = {**PIN_A, "decode": {"tp": 1, "pp": 1, "replicas": 3}}
    async with operator_env(plan_fn=plan_fn(), resync_seconds=0.3) as env:
        await env.start_operator()
        await env.create(dsd("llm", planner={"pin": PIN_A}))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        before = names(env.api, NS, "llm")
        await env.patch_spec("llm", {"planner": {"pin": more}})

        def decode_replicas() -> int:
            sets = env.children("apps/v1/statefulsets", "llm")
            return next(x["spec"]["replicas"] for x in sets if "-decode-" in x["metadata"]["name"])

        # The plan is recorded before the children are applied: wait for the StatefulSet itself.
        await eventually(lambda: decode_replicas() == 3, what="decode scaled to 3")
        assert names(env.api, NS, "llm") == before  # same objects, scaled in place
        assert "rollout" not in env.status("llm")


async def test_switching_to_colocated_serving_is_staged_too() -> None:
    """spec.serving.mode Colocated: colocated instances (each both a prefill and a decode instance)
    come up beside the disaggregated ones, which drain once they serve."""
    async with operator_env(plan_fn=plan_fn(), rollout_poll_seconds=0.3) as env:
        ctl = StatefulSetController(env.api, env.url, env.session, NS, ready_seconds=1.0, drain_seconds=0.3)
        async with ctl.running():
            await env.start_operator()
            await env.create(dsd("llm"))
            await eventually(
                lambda: (env.condition("llm", "Ready") or {}).get("status") == "True", what="Ready"
            )
            start = len(ctl.history)
            await env.patch_spec("llm", {"serving": {"mode": "Colocated"}})
            await eventually(
                lambda: (
                    (env.status("llm").get("plan") or {}).get("mode") == "Colocated"
                    and len(_revisions(env)) == 1
                    and "rollout" not in env.status("llm")
                ),
                timeout=30,
                what="only colocated groups left",
            )
            roles = {
                s["metadata"]["labels"]["distserve.io/role"]
                for s in env.children("apps/v1/statefulsets", "llm")
            }
            assert roles == {"colocated"}
            planned = env.condition("llm", "Planned")
            assert planned is not None and "Colocated" in planned["message"]  # and why
        during = ctl.history[start:]
        assert during and all(min(r.values()) >= 1 for _, r in during)
