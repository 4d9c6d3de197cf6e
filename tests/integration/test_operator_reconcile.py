"""The real operator (kopf, in-process) against an API-server emulator (kmock) over HTTP:
children, status, SLO changes, invalid specs, deletion and restarts."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.harness import NS, eventually, operator_env
from operator_support.manifests import dsd
from operator_support.planners import plan_fn

STS = "apps/v1/statefulsets"


async def test_apply_creates_children_with_planned_replicas_and_status() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        # The plan is recorded first, then the children, then readiness (Ready) last.
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="Ready")
        plan = status["plan"]
        sets = env.children(STS, "llm")
        assert len(sets) == plan["prefill"]["pp"] + plan["decode"]["pp"]
        by_role = {s["metadata"]["labels"]["distserve.io/role"] + s["metadata"]["name"][-3:]: s for s in sets}
        prefill = by_role["prefill-s0"]
        assert prefill["spec"]["replicas"] == plan["prefill"]["replicas"]
        pod = prefill["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(plan["prefill"]["tp"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "podAntiAffinity" in pod["affinity"]  # High affinity spreads instances
        decode = by_role["decode-s0"]
        assert decode["spec"]["replicas"] == plan["decode"]["replicas"]
        owner_uid = env.cr("llm")["metadata"]["uid"]
        for s in sets:
            assert s["metadata"]["ownerReferences"][0]["uid"] == owner_uid
        names = {o["metadata"]["name"] for o in env.children("v1/services", "llm")}
        # The router's, the role Services, and one governing each stage StatefulSet.
        assert names == {"llm", "llm-prefill", "llm-decode"} | {s["metadata"]["name"] for s in sets}
        assert all(s["spec"]["serviceName"] == s["metadata"]["name"] for s in sets)
        rev = sets[0]["metadata"]["labels"]["distserve.io/revision"]
        assert {c["metadata"]["name"] for c in env.children("v1/configmaps", "llm")} == {
            "llm-plan",
            f"llm-plan-{rev}",
        }
        assert env.children("apps/v1/deployments", "llm")[0]["metadata"]["name"] == "llm-router"
        assert env.children("networking.k8s.io/v1/networkpolicies", "llm")
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="Ready")
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["Planned"]["status"] == "True"
        assert conds["Ready"]["status"] == "False"  # no kubelet in the emulator: nothing is ready
        assert conds["Progressing"]["status"] == "True"
        assert all(c["lastTransitionTime"] for c in conds.values())
        assert status["observedGeneration"] == 1
        assert {r["name"] for r in status["roles"]} >= {"prefill-s0", "decode-s0", "router"}
        assert status["assumptions"]["requestsPerSecond"] == 550
        assert "kopf" not in status  # kopf's bookkeeping lives in annotations
        # kopf records the handled spec after the handler returns.
        await eventually(
            lambda: (
                "distserve.io/last-handled-configuration"
                in (env.cr("llm")["metadata"].get("annotations") or {})
            ),
            what="kopf's annotation",
        )
        assert env.cr("llm")["metadata"]["finalizers"] == ["distserve.io/finalizer"]
        assert any(e.get("reason") == "Planned" for e in env.events())


@pytest.mark.parametrize("bad", [{"slo": {"ttftMillis": -5, "tpotMillis": 100}}, {"slo": {"ttftMilis": 5}}])
async def test_invalid_spec_gets_condition_and_no_children(bad: dict) -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("bad", **bad))
        cond = await eventually(lambda: env.condition("bad", "Planned"), what="Planned condition")
        assert cond["status"] == "False"
        assert cond["reason"] == "InvalidSpec"
        assert "spec.slo.ttft" in cond["message"]
        # Resyncs later: still nothing created, no crash loop, one Warning event.
        gets = env.api.count("GET", "/distservedeployments/bad")
        await eventually(
            lambda: env.api.count("GET", "/distservedeployments/bad") >= gets + 2, what="resyncs"
        )
        for key in (STS, "apps/v1/deployments", "v1/services", "v1/configmaps"):
            assert env.children(key, "bad") == []
        assert (env.condition("bad", "Planned") or {})["lastTransitionTime"] == cond["lastTransitionTime"]
        assert [e["reason"] for e in env.events() if e.get("reason") == "InvalidSpec"] == ["InvalidSpec"]


def _replicas(env, name: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {s["metadata"]["name"]: s["spec"]["replicas"] for s in env.children(STS, name)}


async def test_changing_the_slo_replans_and_changes_replicas() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        before = _replicas(env, "llm")
        first_plan = env.status("llm")["plan"]

        await env.patch_spec("llm", {"slo": {"ttftMillis": 30, "tpotMillis": 5, "attainmentPercent": 90}})
        status = await eventually(
            lambda: env.status("llm").get("observedGeneration") == 2 and env.status("llm"),
            what="observedGeneration 2",
        )
        plan = status["plan"]
        assert (plan["prefill"], plan["decode"]) != (first_plan["prefill"], first_plan["decode"])

        def decode_pods() -> int:
            return sum(r for n, r in _replicas(env, "llm").items() if "-decode-" in n)

        # Children are applied one by one: wait for the whole new shape, not the first change.
        expected = plan["decode"]["replicas"] * plan["decode"]["pp"]
        await eventually(lambda: decode_pods() == expected, what="decode pods to match the new plan")
        assert _replicas(env, "llm") != before
        assert any(e.get("reason") == "Replanned" for e in env.events())

        # Back to the first SLO: the first plan's shapes return and stage StatefulSets that are
        # no longer rendered (a smaller pp) are deleted.
        await env.patch_spec("llm", {"slo": {"ttftMillis": 200, "tpotMillis": 100, "attainmentPercent": 90}})
        await eventually(lambda: set(_replicas(env, "llm")) == set(before), what="stale StatefulSets pruned")
        await eventually(lambda: _replicas(env, "llm") == before, what="the first replicas back")


async def test_ready_replicas_make_the_deployment_ready() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        # Play the StatefulSet/Deployment controllers: every desired replica becomes ready.
        for key in (STS, "apps/v1/deployments"):
            for obj in env.children(key, "llm"):
                path = (
                    f"/apis/apps/v1/namespaces/{NS}/{key.rsplit('/', 1)[1]}/{obj['metadata']['name']}/status"
                )
                async with env.session.patch(
                    env.url + path,
                    json={"status": {"readyReplicas": obj["spec"]["replicas"]}},
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as r:
                    assert r.status < 400
        ready = await eventually(
            lambda: (
                (env.condition("llm", "Ready") or {}).get("status") == "True"
                and env.condition("llm", "Ready")
            ),
            what="Ready=True",
        )
        assert ready["reason"] == "AllReplicasReady"
        assert (env.condition("llm", "Progressing") or {})["status"] == "False"
        assert all(r["readyReplicas"] == r["replicas"] for r in env.status("llm")["roles"])


async def test_restarted_operator_converges_without_duplicates_and_repairs_children() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        kinds = [
            STS,
            "apps/v1/deployments",
            "v1/services",
            "v1/configmaps",
            "networking.k8s.io/v1/networkpolicies",
        ]
        first = {k: sorted(o["metadata"]["uid"] for o in env.children(k, "llm")) for k in kinds}
        await env.stop_operator()

        # While it is down, someone deletes the router Service by hand.
        async with env.session.delete(
            f"{env.url}/api/v1/namespaces/{NS}/services/llm", timeout=aiohttp.ClientTimeout(total=10)
        ) as r:
            assert r.status < 400
        await env.start_operator()
        await eventually(
            lambda: any(o["metadata"]["name"] == "llm" for o in env.children("v1/services", "llm")),
            what="the deleted Service to come back",
        )
        created_before = env.api.created()
        # Let a few resyncs pass: nothing more gets created.
        applies = env.api.count("PATCH", "/deployments/llm-router")
        await eventually(
            lambda: env.api.count("PATCH", "/deployments/llm-router") >= applies + 2, what="resyncs"
        )
        assert env.api.created() == created_before
        second = {k: sorted(o["metadata"]["uid"] for o in env.children(k, "llm")) for k in kinds}
        for k in kinds:
            if k != "v1/services":
                assert second[k] == first[k], k  # same objects, not re-created
        assert len(second["v1/services"]) == 3 + len(second[STS])  # router, roles, one per stage


async def test_deleting_the_deployment_raises_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        await env.delete("llm")
        await eventually(lambda: env.cr("llm") is None, what="the CR to be gone (finalizer released)")
        await env.stop_operator()
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], [r.getMessage() for r in errors]


async def test_operator_metrics_are_served() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with operator_env(plan_fn=plan_fn(), metrics_port=port) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")

        async def scrape() -> str | None:
            async with env.session.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            created = (
                'distserve_operator_replans_total{deployment="llm",namespace="serving",reason="Created"} 1.0'
            )
            return text if created in text else None

        text = await eventually(scrape, what="operator metrics")
        assert "distserve_operator_reconcile_seconds_count" in text
        assert "distserve_operator_plan_seconds_count 1.0" in text
        changes = (
            'distserve_operator_plan_changes_total{deployment="llm",namespace="serving",reason="Created"} 1.0'
        )
        assert changes in text
        # The lines the dashboard draws: the spec's SLO, the plan's rate and replicas (manifests.py).
        key = 'deployment="llm",namespace="serving"'
        assert f"distserve_operator_slo_ttft_target_seconds{{{key}}} 0.2" in text
        assert f"distserve_operator_slo_attainment_target_ratio{{{key}}} 0.9" in text
        assert f"distserve_operator_planned_requests_per_second{{{key}}} 550.0" in text
        assert f"distserve_operator_planned_goodput_requests_per_second{{{key}}}" in text
        assert f'distserve_operator_replicas{{{key},role="router",stage="0"}}' in text
        assert f'distserve_operator_ready_replicas{{{key},role="decode",stage="0"}}' in text

        await env.delete("llm")

        async def forgotten() -> str | None:
            async with env.session.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            return text if "distserve_operator_replicas{" not in text else None

        text = await eventually(forgotten, what="a deleted deployment's gauges to go")
        assert f"distserve_operator_slo_ttft_target_seconds{{{key}}}" not in text


async def test_gang_scheduling_creates_podgroups_and_ungates_pods() -> None:
    async with operator_env(plan_fn=plan_fn(), gang_scheduling=True) as env:
        await env.start_operator()
        await env.create(dsd("llm", placement={"affinity": "High", "gangScheduling": "PodGroup"}))
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="Ready")
        groups = env.children("scheduling.x-k8s.io/v1alpha1/podgroups", "llm")
        plan = status["plan"]
        assert len(groups) == plan["prefill"]["replicas"] + plan["decode"]["replicas"]
        # Play the StatefulSet controller: create ordinal 0 of the decode stage-0 StatefulSet, gated.
        sts = next(
            s
            for s in env.children(STS, "llm")
            if s["metadata"]["name"].startswith("llm-decode-") and s["metadata"]["name"].endswith("-s0")
        )
        rev = sts["metadata"]["labels"]["distserve.io/revision"]
        template = sts["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{sts['metadata']['name']}-0", "labels": template["metadata"]["labels"]},
            "spec": template["spec"],
        }
        async with env.session.post(f"{env.url}/api/v1/namespaces/{NS}/pods", json=pod) as r:
            assert r.status < 400
        live = await eventually(
            lambda: (
                (p := env.api.fetch("v1/pods", NS, f"{sts['metadata']['name']}-0"))
                and not p["spec"].get("schedulingGates")
                and p
            ),
            what="the pod to be ungated",
        )
        assert live["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == f"llm-decode-{rev}-i0"


async def test_gang_scheduling_without_the_pod_watch_degrades_instead_of_gating_pods() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm", placement={"affinity": "High", "gangScheduling": "PodGroup"}))
        degraded = await eventually(
            lambda: (
                (c := env.condition("llm", "Degraded")) and c["reason"] == "GangSchedulingUnavailable" and c
            ),
            what="Degraded=GangSchedulingUnavailable",
        )
        assert "podGroups.enabled=true" in degraded["message"]
        # Pods would wait forever behind a gate nobody lifts: none is rendered, and no PodGroup.
        for sts in env.children(STS, "llm"):
            assert not sts["spec"]["template"]["spec"].get("schedulingGates")
        assert not env.children("scheduling.x-k8s.io/v1alpha1/podgroups", "llm")


async def test_fixing_an_invalid_spec_deploys_it() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm", slo={"ttftMillis": -5, "tpotMillis": 100}))
        await eventually(
            lambda: (env.condition("llm", "Planned") or {}).get("reason") == "InvalidSpec", what="invalid"
        )
        await env.patch_spec("llm", {"slo": {"ttftMillis": 200, "tpotMillis": 100}})
        planned = await eventually(
            lambda: (c := env.condition("llm", "Planned")) and c["status"] == "True" and c,
            what="Planned=True",
        )
        assert planned["observedGeneration"] == 2
        await eventually(lambda: env.children(STS, "llm"), what="children")


async def test_low_affinity_places_decode_with_prefill() -> None:
    cluster = {
        "gpu": {"type": "A100-80GB"},
        "gpusPerNode": 4,
        "nodes": 2,
        "interconnect": {"intraNodeGBps": 300, "interNodeGBps": 3},
    }
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(
            dsd("llm", cluster=cluster, placement={"affinity": "Low", "stageLayout": "SeparatePods"})
        )
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="Ready")
        assert status["plan"]["affinity"] == "Low"
        decode = [
            s for s in env.children(STS, "llm") if s["metadata"]["labels"]["distserve.io/role"] == "decode"
        ]
        assert decode
        for sts in decode:
            term = sts["spec"]["template"]["spec"]["affinity"]["podAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ][0]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            assert term["labelSelector"]["matchLabels"]["distserve.io/role"] == "prefill"


# SmolLM2 has 9 attention heads and 3 KV heads: TP3 splits them, TP2 does not.
PIN = {"prefill": {"tp": 3, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 1, "replicas": 2}}


async def test_a_pinned_plan_is_what_is_deployed() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm", planner={"pin": PIN}))
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="Ready")
        plan = status["plan"]
        assert plan["pinned"] is True and plan["plannerChoice"]["gpus"] >= 1
        assert (plan["prefill"]["tp"], plan["prefill"]["replicas"], plan["decode"]["replicas"]) == (3, 1, 2)
        planned = env.condition("llm", "Planned")
        assert planned is not None and planned["status"] == "True"
        assert "Pinned by spec.planner.pin" in planned["message"]  # and how the planner's choice compares
        sets = {s["metadata"]["labels"]["distserve.io/role"]: s for s in env.children(STS, "llm")}
        prefill = sets["prefill"]["spec"]
        container = prefill["template"]["spec"]["containers"][0]
        assert prefill["replicas"] == 1 and container["resources"]["limits"]["nvidia.com/gpu"] == "3"
        assert sets["decode"]["spec"]["replicas"] == 2
        # The plan file the pods mount says the same, with the limits the planner simulated.
        mounted = prefill["template"]["spec"]["volumes"][0]["configMap"]["name"]
        (cm,) = [c for c in env.children("v1/configmaps", "llm") if c["metadata"]["name"] == mounted]
        contract = json.loads(cm["data"]["plan.json"])
        assert contract["prefill"]["tp"] == 3 and contract["decode"]["replicas"] == 2
        assert contract["limits"] == plan["limits"]


async def test_a_pin_that_cannot_run_is_not_planned_and_names_the_field() -> None:
    bad = {**PIN, "prefill": {"tp": 2, "pp": 1, "replicas": 1}}
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm", planner={"pin": bad}))
        cond = await eventually(lambda: env.condition("llm", "Planned"), what="Planned condition")
        assert cond["status"] == "False" and cond["reason"] == "PlanFailed"
        assert "spec.planner.pin.prefill.tp" in cond["message"]
        assert "9 attention heads" in cond["message"] and "use a TP that divides 9" in cond["message"]
        assert env.children(STS, "llm") == []
        # Fixing the pin deploys it.
        await env.patch_spec("llm", {"planner": {"pin": PIN}})
        await eventually(lambda: env.children(STS, "llm"), what="children after the fix")


async def test_the_latency_profile_is_a_bundled_one_or_a_configmaps() -> None:
    """spec.planner.profile names a profile shipped in the operator's package; profileConfigMap one
    of the user's, read from the API and handed to the planner parsed. A ConfigMap holding no profile
    is reported in Planned, naming the field, and planned with once it is fixed."""
    root = Path(__file__).resolve().parents[2]
    opt13 = {
        "model": {"name": "facebook/opt-13b"},
        "workload": {"requestsPerSecond": "10"},
        "cluster": {"gpusPerNode": 4},
    }
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("bundled", **opt13, planner={"profile": "opt-13b-a100-80gb-distserve"}))
        mine = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "mine"},
            "data": {"profile.json": "{not json"},
        }
        async with env.session.post(f"{env.url}/api/v1/namespaces/{NS}/configmaps", json=mine) as r:
            assert r.status < 400, await r.text()
        await env.create(dsd("own", **opt13, planner={"profileConfigMap": "mine"}))

        plan = await eventually(lambda: env.status("bundled").get("plan"), what="the bundled profile's plan")
        assert plan["profile"].startswith("bundled profile opt-13b-a100-80gb-distserve: DistServe profiler")
        cond = await eventually(
            lambda: (c := env.condition("own", "Planned")) and c["reason"] == "ProfileInvalid" and c,
            what="Planned=False for the ConfigMap that holds no profile",
        )
        assert cond["status"] == "False" and "plan" not in env.status("own")
        assert cond["message"].startswith(
            f"spec.planner.profileConfigMap: ConfigMap {NS}/mine key profile.json"
        )
        assert "not JSON" in cond["message"] and "fix:" in cond["message"]

        # Fixed (here with the bundled vLLM profile's text): the resync plans with it.
        text = (root / "deploy" / "profiles" / "opt-13b-a100-80gb-vllm.json").read_text()
        headers = {"Content-Type": "application/merge-patch+json"}
        path = f"{env.url}/api/v1/namespaces/{NS}/configmaps/mine"
        async with env.session.patch(path, json={"data": {"profile.json": text}}, headers=headers) as r:
            assert r.status < 400, await r.text()
        plan = await eventually(lambda: env.status("own").get("plan"), what="the ConfigMap profile's plan")
        assert plan["profile"].startswith(f"ConfigMap {NS}/mine: DistServe profiler, vLLM")
        assert env.condition("own", "Planned")["status"] == "True"


async def test_children_are_server_side_applied_and_fields_others_own_survive() -> None:
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        await env.create(dsd("llm"))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        sts = env.children(STS, "llm")[0]
        name = sts["metadata"]["name"]
        # One server-side apply per child under the operator's field manager; no GET + compare.
        child_writes = [
            (m, url, ct)
            for m, url, ct in env.api.log
            if m in ("POST", "PUT", "PATCH") and "/events" not in url and "distservedeployments" not in url
        ]
        assert child_writes
        for method, url, content_type in child_writes:
            assert method == "PATCH", url
            assert content_type in ("application/apply-patch+yaml", "create"), url
            assert "fieldManager=distserve-operator" in url and "force=true" in url, url
        assert env.api.count("GET", f"/statefulsets/{name}") == 0

        # A user labels the StatefulSet and hand-edits the worker image.
        path = f"{env.url}/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"
        merge = {"Content-Type": "application/merge-patch+json"}
        label = {"metadata": {"labels": {"team": "search"}}}
        async with env.session.patch(
            path, json=label, params={"fieldManager": "kubectl-label"}, headers=merge
        ) as r:
            assert r.status < 400
        containers = sts["spec"]["template"]["spec"]["containers"]
        image = containers[0]["image"]
        edited = [{**containers[0], "image": "registry.example/hacked:1"}, *containers[1:]]
        edit = {"spec": {"template": {"spec": {"containers": edited}}}}
        async with env.session.patch(
            path, json=edit, params={"fieldManager": "kubectl-edit"}, headers=merge
        ) as r:
            assert r.status < 400
        owners = env.api.managers(STS, NS, name)
        assert "metadata.labels.team" in owners["kubectl-label"]
        assert any(p.endswith("].image") for p in owners["kubectl-edit"])

        # The next resyncs apply again: the operator's rendering wins where it owns the field
        # (force), the label it never set survives.
        applies = env.api.count("PATCH", f"/statefulsets/{name}?")
        await eventually(
            lambda: env.api.count("PATCH", f"/statefulsets/{name}?") >= applies + 2, what="resyncs"
        )
        live = env.api.fetch(STS, NS, name)
        assert live is not None
        assert live["metadata"]["labels"]["team"] == "search"
        assert live["spec"]["template"]["spec"]["containers"][0]["image"] == image
        owners = env.api.managers(STS, NS, name)
        assert "metadata.labels.team" in owners["kubectl-label"]
        assert not any(p.endswith("].image") for p in owners.get("kubectl-edit", set()))
        managed = {(e["manager"], e["operation"]) for e in live["metadata"]["managedFields"]}
        assert ("distserve-operator", "Apply") in managed
