"""Ready models: one file per model, its config dataclass at the top and a PRESETS dict at the end.

What every model promises (its `.config`, one `setup_cache` signature, one input check, one output convention,
and the self-description `vermeil info` and tensor parallelism read) is stated once in `contract.py`.
"""
