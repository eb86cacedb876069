"""Checks a conversion against transformers: same checkpoint, same random inputs.

Needs torch and transformers (the `test` extra); nothing else in mm1_jax does.
Encoders are compared on their final hidden states (every patch token after the
trunk's last norm, CLS dropped); decoders on the final hidden states and the logits.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mm1_jax import decoder, model, vit
from mm1_jax.hf import convert

DEFAULT_TOLERANCE = 1e-4  # float32


def _hf_model(kind: str, src: Path):
  import transformers as T  # noqa: PLC0415  (transformers: only to verify a conversion)

  classes = {"clip": T.CLIPVisionModel, "siglip": T.SiglipVisionModel, "aimv2": T.Aimv2VisionModel}
  cls = classes.get(kind, T.AutoModelForCausalLM)
  model = cls.from_pretrained(str(src), dtype="float32", attn_implementation="eager", use_safetensors=True)
  return model.eval()


def verify(kind: str, src: str | Path, *, batch: int = 2, seq_len: int = 16, seed: int = 0,
           tolerance: float = DEFAULT_TOLERANCE) -> dict:
  """Returns {'kind', 'max_abs_diff_hidden', ['max_abs_diff_logits'], 'tolerance', 'ok', ...}."""
  import torch  # noqa: PLC0415  (torch: only to verify a conversion)

  src = Path(src)
  conv = convert.to_params(kind, src, scan_layers=True)
  hf = _hf_model(kind, src)
  rng = np.random.default_rng(seed)
  result = {"kind": kind, "src": str(src), "tolerance": tolerance, "unused_tensors": len(conv.unused)}

  if conv.component == "encoder":
    cfg = conv.config
    images = rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    ours = vit.ViT(cfg).apply({"params": conv.params}, jnp.asarray(images))
    pixels = (images.astype(np.float32) / 255.0 - np.asarray(cfg.pixel_mean, np.float32)) / np.asarray(
        cfg.pixel_std, np.float32)
    with torch.no_grad():
      out = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
      theirs = out.last_hidden_state
      if kind == "clip":  # CLIP's post-LayerNorm is applied to the pooled token only; apply to all
        tower = getattr(hf, "vision_model", hf)
        theirs = tower.post_layernorm(theirs)[:, 1:]
    result["max_abs_diff_hidden"] = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
    result["shape"] = list(np.shape(ours))
  else:
    cfg = conv.config
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len), dtype=np.int64)
    dec = decoder.Decoder(cfg)
    x = dec.apply({"params": conv.params}, jnp.asarray(tokens, jnp.int32), method=decoder.Decoder.embed)
    mask = model.segment_causal_mask(jnp.ones((batch, seq_len), jnp.int32), cfg.sliding_window)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    (logits, _), state = dec.apply({"params": conv.params}, x, mask, positions, mutable=["intermediates"])
    hidden = state["intermediates"]["hidden_states"][0]
    with torch.no_grad():  # one forward pass: the base model, then the head on its output
      theirs_hidden = hf.model(input_ids=torch.from_numpy(tokens)).last_hidden_state
      theirs_logits = hf.lm_head(theirs_hidden)
    result["max_abs_diff_hidden"] = float(np.abs(np.asarray(hidden) - theirs_hidden.numpy()).max())
    result["max_abs_diff_logits"] = float(np.abs(np.asarray(logits) - theirs_logits.numpy()).max())
    result["shape"] = list(np.shape(logits))
  diffs = [v for k, v in result.items() if k.startswith("max_abs_diff")]
  result["ok"] = bool(all(np.isfinite(d) and d <= tolerance for d in diffs))
  return result
