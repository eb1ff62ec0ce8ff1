"""VAEs on disk: loading and saving every format vaegan speaks, key naming, hub names, model cards, training
checkpoint files, and the `convert` and `info` commands."""
