"""Pipeline parallelism: an instance's layers split over stage processes (see pp/partial.py, pp/chain.py)."""
