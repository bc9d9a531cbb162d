"""`rlhf-jax plan`: each stage's per-device memory, from XLA's analysis of the stage's real
programs compiled on abstract inputs (no weight is ever allocated), against the device's
memory, with the switches that would make a stage fit. See docs/memory.md.

Above `loops` in the import order: each stage is the loops' own `StageBuild`
(`loops/build*.py`), run here on abstract inputs; modules: `devices` (how many devices, how
much memory), `abstract` (model configs, sharded ShapeDtypeStruct trees, a build run under
`jax.eval_shape`), `planner` (which stages, compile, split the peak into parts), `advice` (the
switches), `report` (table, JSON), `command` (the CLI), `measure` (the check against a real
run).
"""
