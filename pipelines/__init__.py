"""Raw-corpus readers, stage entry points, the workflow and the `omni` CLI."""
