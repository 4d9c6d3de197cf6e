"""DistServe operator: API models, the placement planner, and the kopf operator."""

__version__ = "0.1.0"
