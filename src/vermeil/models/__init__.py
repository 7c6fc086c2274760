"""Ready models: one file per model, its config dataclass at the top and a PRESETS dict at the end."""
