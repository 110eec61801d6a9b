"""The stage graph: state, stage nodes, routing, planning, tracing and replay."""
