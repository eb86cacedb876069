"""Hugging Face checkpoints in and out: `mm1-convert` (see `mm1_jax.hf.cli`).

`convert` reads safetensors with numpy (no torch at run time); `verify` loads the
same checkpoint with transformers (the `test` extra) and compares outputs.
"""
