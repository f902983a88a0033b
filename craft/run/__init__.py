"""The run: its config, its store, its folder layout, checkpoints and processes (the bottom of the library)."""
