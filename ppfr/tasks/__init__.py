"""One module per experiment task: `run(cfg, run) -> dict` of measured numbers."""
