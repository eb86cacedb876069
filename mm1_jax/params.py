"""`mm1-params`: parameter counts of a model config, per part, with no memory spent.

The model is traced with jax.eval_shape, so full-size presets (ViT-H + 30B decoder)
are counted on any laptop.

  mm1-params --gin_file=gin/models/mm1_7b.gin [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from mm1_jax import gin_cli
from mm1_jax.contrastive import ImageObjectiveConfig
from mm1_jax.model import MM1Config


def abstract_params(config: MM1Config | ImageObjectiveConfig):
  """The parameter tree of a config as jax.ShapeDtypeStructs (nothing allocated)."""
  s = config.encoder.image_size
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  images = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.uint8)
  variables = jax.eval_shape(config.build().init, jax.random.PRNGKey(0), tokens, images, tokens, tokens)
  return nn.meta.unbox(variables)["params"]


def count_parameters(config: MM1Config | ImageObjectiveConfig, params=None) -> dict[str, int]:
  """{part: parameters}: every top-level part (MM1: encoder, connector, decoder; AIM adds
  its pixel head; the contrastive objective its pooling head, projections, text tower,
  temperature and bias), the decoder's embedding / blocks / head, total, and the active
  counts (a sparse decoder runs top_k of its experts per token). `params`: the config's
  `abstract_params`, if already at hand."""
  params = abstract_params(config) if params is None else params
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  order = ("encoder", "connector", "decoder", "head", "pixel_head")
  parts = sorted(params, key=lambda k: (order.index(k) if k in order else len(order), k))
  counts = {part: size(params[part]) for part in parts}
  total = sum(counts.values())
  if "decoder" not in params:
    return dict(counts, total=total, **{"total.active": total})
  dec = params["decoder"]
  counts.update({"decoder.embedding": size(dec["embedding"]), "decoder.blocks": size(dec["blocks"]),
                 "decoder.lm_head": size(dec.get("lm_head", {}))})
  counts["total"] = total
  moe = config.decoder.moe
  if moe is not None:
    # Each token runs top_k of the num_experts experts: the rest are inactive for it.
    experts = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(dec["blocks"])
                  if any(getattr(k, "key", None) == "moe" for k in path)
                  and getattr(path[-1], "key", None) in ("gate", "up", "down"))
    counts["decoder.experts"] = experts
    inactive = experts - experts * moe.top_k // moe.num_experts
    counts["decoder.active"] = counts["decoder"] - inactive
    counts["total.active"] = counts["total"] - inactive
  else:
    counts["decoder.active"] = counts["decoder"]
    counts["total.active"] = counts["total"]
  return counts


def format_table(counts: dict[str, int]) -> str:
  width = max(len(k) for k in counts)
  return "\n".join(f"{k:<{width}}  {v:>16,d}  ({v / 1e9:.3f}B)" for k, v in counts.items())


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = gin_cli.split_bindings(argv)
  parser = argparse.ArgumentParser(prog="mm1-params", description=__doc__)
  gin_cli.add_gin_flags(parser, example="gin/models/mm1_7b.gin (defines MODEL)")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  args = parser.parse_args(rest)
  gin_cli.parse(args, bindings, read_by_command=("MODEL",))
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  counts = count_parameters(config)
  print(json.dumps(counts) if args.json else format_table(counts))
  return 0


if __name__ == "__main__":
  from mm1_jax import console

  sys.exit(console.run("params"))
