"""Reading what the planner plans from: model files, profile files and bundled profiles, traces, and
the DistServeDeployment spec (`spec.plan_input`). The core (`plan()`, the search, the simulator)
takes data, never a path; `make lint`'s import contracts keep it from importing this package."""
