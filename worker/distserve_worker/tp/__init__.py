"""Tensor parallelism inside an instance: rank 0 (group.py) drives the follower ranks (follower.py)."""
