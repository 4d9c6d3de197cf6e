"""The operator's per-deployment gauges: what the dashboard draws the observed series against."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from distserve_operator.api import DistServeDeploymentStatus, Slo
from distserve_operator.metrics import OperatorMetrics, role_and_stage


def samples(m: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
        if "deployment" in s.labels
    }


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"namespace": "ml", "deployment": "llm", **labels}.items()))


def status(roles: list[tuple[str, int, int]], rate: float = 12.5) -> DistServeDeploymentStatus:
    return DistServeDeploymentStatus.model_validate(
        {
            "assumptions": {"requestsPerSecond": rate},
            "roles": [{"name": n, "replicas": r, "readyReplicas": ready} for n, r, ready in roles],
        }
    )


SLO = Slo.model_validate({"ttftMillis": 250, "tpotMillis": 40, "attainmentPercent": 95})


def test_role_and_stage_of_status_names() -> None:
    assert role_and_stage("prefill-s1") == ("prefill", "1")
    assert role_and_stage("prefill-decode-s0") == ("prefill-decode", "0")
    assert role_and_stage("router") == ("router", "0")


def test_record_sets_slo_targets_planned_rate_and_replicas_in_base_units() -> None:
    m = OperatorMetrics()
    m.record("ml", "llm", SLO, status([("prefill-s0", 2, 1), ("decode-s0", 3, 3), ("router", 1, 1)]))
    got = samples(m)
    assert got[("distserve_operator_slo_ttft_target_seconds", key())] == 0.25
    assert got[("distserve_operator_slo_tpot_target_seconds", key())] == 0.04
    assert got[("distserve_operator_slo_attainment_target_ratio", key())] == 0.95
    assert got[("distserve_operator_planned_requests_per_second", key())] == 12.5
    assert got[("distserve_operator_replicas", key(role="prefill", stage="0"))] == 2
    assert got[("distserve_operator_ready_replicas", key(role="prefill", stage="0"))] == 1
    assert got[("distserve_operator_replicas", key(role="router", stage="0"))] == 1


def test_a_role_the_new_plan_dropped_and_a_deleted_deployment_leave_no_series() -> None:
    m = OperatorMetrics()
    m.record("ml", "other", SLO, status([("decode-s0", 1, 1)]))
    m.record("ml", "llm", SLO, status([("prefill-s0", 1, 1), ("prefill-s1", 1, 1), ("decode-s0", 2, 2)]))
    m.record("ml", "llm", SLO, status([("prefill-s0", 2, 0), ("decode-s0", 2, 2)], rate=20))
    got = samples(m)
    assert ("distserve_operator_replicas", key(role="prefill", stage="1")) not in got
    assert got[("distserve_operator_replicas", key(role="prefill", stage="0"))] == 2
    assert got[("distserve_operator_planned_requests_per_second", key())] == 20
    m.forget("ml", "llm")
    left = samples(m)
    assert all(dict(labels)["deployment"] == "other" for _, labels in left)
    assert ("distserve_operator_replicas", key(deployment="other", role="decode", stage="0")) in left


def test_plans_made_and_applied_count_per_deployment_and_reason() -> None:
    m = OperatorMetrics()
    m.replanned("ml", "llm", "Created")
    m.plan_changed("ml", "llm", "Created")
    m.replanned("ml", "llm", "RateDrift")
    m.replanned("ml", "llm", "RateDrift")  # the second re-plan changed nothing: not applied
    m.plan_changed("ml", "llm", "RateDrift")
    m.forget("ml", "llm")  # history stays: the dashboard's re-plan annotations read it
    got = samples(m)
    assert got[("distserve_operator_replans_total", key(reason="RateDrift"))] == 2
    assert got[("distserve_operator_plan_changes_total", key(reason="RateDrift"))] == 1
    assert got[("distserve_operator_plan_changes_total", key(reason="Created"))] == 1
