"""A deterministic replay of a bursty traffic trace through the router's metrics text and the
operator's own scaling decisions (scaling.consider / scaling.adopt, the real planner), on a
virtual clock: how often replicas change, and where they end."""

from __future__ import annotations

import itertools
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.fake_router import FakeRouter, Traffic
from operator_support.manifests import dsd

from distserve_operator import children, conditions, drift, observe, scaling
from distserve_operator.api import PlanStatus, WorkloadSnapshot, parse_spec
from distserve_planner import plan_deployment

INTERVAL = 60
COOLDOWN = 300
READY_AFTER = 90  # seconds a new instance takes to turn Ready
# req/s per minute: a calm start, spikes shorter than the cooldown, a sustained doubling, a
# choppy stretch, then a settled final rate.
TRACE = [550] * 10 + [1400, 550, 300, 1300, 550] + [1100] * 15 + [2000, 600, 2000, 600] + [800] * 26
FINAL_RATE = 800


def _plan_for(spec, rate: float) -> PlanStatus:  # type: ignore[no-untyped-def]
    workload = conditions.assumptions_from_spec(spec).model_copy(update={"requests_per_second": rate})
    return plan_deployment(spec, workload_override=workload).status


def test_a_bursty_trace_changes_replicas_no_more_often_than_the_cooldown_and_ends_at_the_final_plan() -> None:
    body = dsd(
        "llm",
        autoscaling={
            "mode": "Planner",
            "intervalSeconds": INTERVAL,
            "cooldownSeconds": COOLDOWN,
            "driftPercent": 20,
        },
    )
    spec = parse_spec(body["spec"])
    auto = spec.autoscaling
    start = datetime(2026, 1, 1, tzinfo=UTC)
    clock = [0.0]
    router = FakeRouter(Traffic(TRACE[0]), clock=lambda: clock[0])

    plan = drift.cap_replicas(
        plan_deployment(spec).status, max_gpus=auto.max_gpus, min_replicas=auto.min_replicas
    )
    first = plan
    assumed: WorkloadSnapshot = conditions.assumptions_from_spec(spec)
    ready = drift.instances(plan)  # the first plan is up before traffic starts
    last_change: datetime | None = None
    changes: list[tuple[int, dict[str, int]]] = []
    held: list[str] = []
    previous = observe.parse_router_metrics(router.render(), clock[0])
    for minute, rate in enumerate(TRACE):
        router.set(Traffic(rate))
        clock[0] += INTERVAL
        scrape = observe.parse_router_metrics(router.render(), clock[0])
        observed = observe.workload_between(previous, scrape)
        previous = scrape
        assert observed is not None
        now = start + timedelta(seconds=clock[0])
        if last_change is not None and (now - last_change).total_seconds() >= READY_AFTER:
            ready = drift.instances(plan)
        desired = drift.instances(plan)
        # Scale-downs take effect at once; instances added become Ready READY_AFTER later.
        ready = {r: min(ready[r], desired[r]) for r in ready}
        pending = scaling.not_ready(desired, ready)
        decision = scaling.consider(
            assumed=assumed,
            observed=observed,
            auto=auto,
            attainment_target=spec.slo.attainment_percent,
            last_change=last_change,
            now=now,
            rollout_in_progress=False,
            pending=pending,
        )
        if decision.held:
            held.append(decision.held)
        if decision.workload is None:
            continue
        proposed = plan_deployment(spec, workload_override=decision.workload).status
        adoption = scaling.adopt(
            plan,
            proposed,
            auto=auto,
            workload=decision.workload,
            pending=pending,
            parallelism_hash=children.parallelism_hash,
        )
        if adoption.plan is not None:
            plan, assumed, last_change = adoption.plan, decision.workload, now
            changes.append((minute, drift.instances(plan)))
        elif not adoption.message.startswith("scale-down"):
            assumed = decision.workload

    # Never two changes within the cooldown.
    minutes = [m for m, _ in changes]
    assert all(b - a >= COOLDOWN // INTERVAL for a, b in itertools.pairwise(minutes))
    # The spikes shorter than the cooldown were held, not followed.
    assert any("cooldown" in h for h in held)
    # It ends at the plan for the final rate: the planner's answer, sized for the running pod
    # shapes (autoscaling.scope Replicas never restarts pods).
    final = drift.instances(
        drift.cap_replicas(
            drift.keep_parallelism(first, _plan_for(spec, FINAL_RATE), FINAL_RATE),
            max_gpus=auto.max_gpus,
            min_replicas=auto.min_replicas,
        )
    )
    assert drift.instances(plan) == final, (changes, final)
    # The count of changes of this trace (deterministic: same trace, same planner, same answer).
    assert len(changes) == EXPECTED_CHANGES, changes


EXPECTED_CHANGES = 4  # minutes 10 (the first spike), 15, 30 and 35
