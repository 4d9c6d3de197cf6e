"""Local mode: the runtime's processes on one machine (`distserve up`, `distserve demo`)."""
