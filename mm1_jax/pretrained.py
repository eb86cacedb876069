"""Start a run from pre-trained parts: `train.init_from = ['DIR', ...]`.

Each DIR is an `mm1-convert import` output (an encoder or a decoder from Hugging
Face) or another run's checkpoints/ folder (all parts). MM1 trains from a
pre-trained CLIP encoder and a pre-trained LLM, so a typical run names two.
`DIR:part,part` takes only the named parts: an image trunk pre-trained with AIM,
AIMv2 (`mm1_jax.aim`) or a contrastive loss (`mm1_jax.contrastive`) is
`<run>/checkpoints:encoder`, leaving its pixel head, caption decoder or text tower behind.

Loaded parts are brought to the model's layout before they replace the fresh
parameters:
  - scanned <-> unrolled layer stacks are restacked;
  - position embeddings of the encoder (and of a C-Abstractor) trained at another
    patch grid are resized bicubically (`vit.resize_pos_embed`).
Anything else that does not match stops the run with the parameter's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from mm1_jax import paths
from mm1_jax import vit as vit_lib
from mm1_jax.checkpoint import load_params
from mm1_jax.hf import convert
from mm1_jax.model import MM1Config


def _relayout(source: Any, target: Any) -> Any:
  """Restacks every BlockStack subtree of `source` to the scanned/unrolled form of `target`."""
  if not isinstance(target, dict) or not isinstance(source, dict):
    return source
  src_scanned, tgt_scanned = "layers" in source, "layers" in target
  src_unrolled = any(k.startswith("block_") for k in source)
  tgt_unrolled = any(k.startswith("block_") for k in target)
  if (src_scanned or src_unrolled) and (tgt_scanned or tgt_unrolled) and src_scanned != tgt_scanned:
    return convert.stack_layers(convert.unstack_layers(source), scan=tgt_scanned)
  return {k: _relayout(v, target[k]) if k in target else v for k, v in source.items()}


def _resize_grids(part: str, tree: dict, target: dict, config: MM1Config) -> dict:
  pos, want = tree.get("pos_embed"), target.get("pos_embed")
  if pos is None or want is None or np.shape(pos) == tuple(want.shape):
    return tree
  prefix = 1 if part == "encoder" and config.encoder.use_cls else 0
  tree = dict(tree, pos_embed=vit_lib.resize_pos_embed(np.asarray(pos), config.encoder.grid, prefix))
  print(f"  {part}/pos_embed resized {np.shape(pos)} -> {tree['pos_embed'].shape}")
  return tree


def parse_source(entry: str) -> tuple[str, tuple[str, ...] | None]:
  """'DIR' -> (DIR, None: every part); 'DIR:a,b' -> (DIR, ('a', 'b')). A DIR that exists
  as written is taken whole, colons included."""
  if paths.is_remote(entry):  # gs://bucket/DIR[:parts]: the scheme's colon is not a part list
    scheme, rest = entry.split("://", 1)
    if ":" not in rest:
      return entry, None
    directory, parts = rest.rsplit(":", 1)
    directory = f"{scheme}://{directory}"
  elif Path(entry).exists() or ":" not in entry:
    return entry, None
  else:
    directory, parts = entry.rsplit(":", 1)
  names = tuple(p.strip() for p in parts.split(",") if p.strip())
  if not names:
    raise ValueError(f"init_from entry {entry!r}: no part names after ':'")
  return directory, names


def load_pretrained(params: dict, shardings: dict, sources: Sequence[str], config: MM1Config) -> dict:
  """Returns `params` with the parts found in `sources` replaced, placed in `shardings`."""
  params = dict(params)
  for entry in sources:
    src, wanted = parse_source(entry)
    loaded = load_params(src)
    if wanted is not None:
      missing = [w for w in wanted if w not in loaded]
      if missing:
        raise ValueError(f"{src} has no part {missing[0]!r} (it holds {sorted(loaded)})")
      loaded = {k: loaded[k] for k in wanted}
    for part, tree in loaded.items():
      if part not in params:
        raise ValueError(f"{src} holds a part {part!r} that the model does not have ({sorted(params)}); "
                         f"name the parts to take with {src}:part,part")
      target = params[part]
      tree = _resize_grids(part, _relayout(tree, target), target, config)
      convert.compare_tree(target, tree, part)  # names the first mismatch
      params[part] = jax.tree.map(
          lambda x, t, s: jax.make_array_from_callback(
              t.shape, s, lambda idx, x=x, t=t: np.asarray(x, t.dtype)[idx]),
          tree, target, shardings[part])
      n = sum(int(np.size(x)) for x in jax.tree.leaves(tree))
      print(f"initialised {part} from {src} ({n / 1e6:.2f}M parameters)")
  return params
