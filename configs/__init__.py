"""Layer 0: the option schema, the experiment-mode table, per-dataset presets and the CLI resolver."""
