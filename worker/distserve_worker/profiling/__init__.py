"""`distserve profile`: time the real engine's forwards and fit the planner's latency model."""
