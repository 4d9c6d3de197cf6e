"""The planner the operator tests run: the real one (numbers asserted relative to its answers)."""

from __future__ import annotations

from distserve_operator.reconcile import PlanFn


def plan_fn() -> PlanFn:
    from distserve_planner import plan_deployment

    return plan_deployment
