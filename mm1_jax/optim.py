"""AdamW with linear warmup, cosine decay and global-norm clipping (MM1's recipe), and
MM1's peak-learning-rate law (`mm1_peak_lr`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import optax

from mm1_jax.decoder import DecoderConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Attributes:
    peak_lr: learning rate after warmup. The MM1 pods take it from `mm1_peak_lr`; MM1
      published 6e-5 (3B), 4e-5 (7B), 2e-5 (30B).
    warmup_steps: linear warmup from 0. MM1: 2000.
    end_lr_ratio: cosine decays to peak_lr * end_lr_ratio at the last step. MM1: 0.1.
    weight_decay: decoupled; optax scales it by the current LR, so 0.1 gives MM1's
      decay of 0.1 x peak LR at the peak. Every weight matrix (MoE experts and router
      included); norms, biases and position tables are not decayed.
    clip_norm: global gradient-norm clip.
    lr_multipliers: per top-level component of the model ("encoder", "connector",
      "decoder"), a factor on its learning rate (warmup, decay and weight decay scale
      with it); 0 freezes the component: its gradients are zeroed before the global-norm
      clip and it keeps no optimizer state. None (default): one rate for everything, as
      MM1 trains all components. A frozen image encoder or a slower one is the usual
      lever when a pre-trained encoder meets a fresh connector and decoder.
  """

  peak_lr: float = 1e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  lr_multipliers: Mapping[str, float] | None = None


# MM1's peak learning rate as a function of the decoder's parameter count N (MM1, section
# 3.3 and appendix): a line in log-log space, fit on the LRs that did best for small dense
# decoders, eta = exp(-0.4214 ln N - 0.5535). At N = 3B, 7B, 30B it gives 5.8e-5, 4.1e-5,
# 2.2e-5, the paper's 6e-5, 4e-5, 2e-5 to one significant digit.
MM1_LR_SLOPE = -0.4214
MM1_LR_INTERCEPT = -0.5535


def mm1_lr_law(num_params: float) -> float:
  """MM1's peak learning rate for a decoder of `num_params` parameters."""
  if num_params <= 0:
    raise ValueError(f"the LR law needs a positive parameter count, got {num_params}")
  return math.exp(MM1_LR_SLOPE * math.log(num_params) + MM1_LR_INTERCEPT)


def lr_law_parameters(decoder: DecoderConfig) -> int:
  """N of the LR law: the decoder's parameters (embedding, blocks and head), counted by
  `mm1_jax.params.count_parameters` from the config alone (jax.eval_shape: nothing is
  allocated).

  Dense: all of them. Sparse (MoE): the active ones, what one token runs (top_k of the
  experts, plus everything dense). The law is fit on dense decoders, where N also measures
  the network each token passes through; that is what an MoE's active count keeps, while its
  total grows with experts that widen no layer a token sees and that each see only a share
  of the tokens. Applied to the total, the law would put MM1-3B-MoE (63B in all) far below
  the rate of the dense 3B it is built on, extrapolated beyond the sizes it was fit on.
  """
  from mm1_jax import model as model_lib  # noqa: PLC0415  (model and params import much of the package)
  from mm1_jax import params as params_lib  # noqa: PLC0415

  # Only the decoder is read: the default encoder and connector are tiny, and the decoder's
  # parameters do not depend on them.
  counts = params_lib.count_parameters(model_lib.MM1Config(decoder=decoder))
  return counts["decoder.active"]


def mm1_peak_lr(decoder: DecoderConfig) -> float:
  """MM1's peak learning rate for `decoder` (`mm1_lr_law` of `lr_law_parameters`).

  A gin callable: the MM1 pods bind `PEAK_LR = @optim.mm1_peak_lr()` with
  `optim.mm1_peak_lr.decoder = @decoder.DecoderConfig()`, the model's decoder."""
  return mm1_lr_law(lr_law_parameters(decoder))


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.peak_lr * config.end_lr_ratio)


# Leaves that are weight matrices or conv kernels (any rank >= 2, stacked layers included):
# dense and attention kernels, token embeddings, and the sparse FFN's router and experts.
DECAYED = ("kernel", "embedding", "router", "gate", "up", "down")


def _decay_mask(params):
  """Decay every weight matrix; not norms, biases, scales or position tables.

  Decided by name: with scanned layers a norm scale is 2-D too ([layers, width]), so rank
  alone cannot tell. tests/test_optim.py checks the names against each preset's tree by rank.
  """
  def decays(path, _):
    dict_keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips flax boxes
    return dict_keys[-1] in DECAYED
  return jax.tree_util.tree_map_with_path(decays, params)


def _component(path) -> str:
  """The top-level component ("encoder", "connector", "decoder", ...) a leaf belongs to."""
  return next(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def make_optimizer(config: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its base schedule (the rate of every component without a
  multiplier; `lr_multipliers` scale it per component)."""
  schedule = make_schedule(config, total_steps)

  def adamw(scale: float) -> optax.GradientTransformation:
    lr = schedule if scale == 1.0 else (lambda step: scale * schedule(step))
    return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=_decay_mask)

  if not config.lr_multipliers:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw(1.0)), schedule
  multipliers = dict(config.lr_multipliers)
  if any(v < 0 for v in multipliers.values()):
    raise ValueError(f"lr_multipliers must be >= 0, got {multipliers}")
  frozen = {k for k, v in multipliers.items() if v == 0}

  def labels(params):
    """Each leaf's component if it has a multiplier, else "default"."""
    found = {_component(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    unknown = set(multipliers) - found
    if unknown:
      raise ValueError(f"lr_multipliers names {sorted(unknown)}, not components of the model "
                       f"({sorted(found)})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _component(path) if _component(path) in multipliers else "default", params)

  def frozen_mask(params):
    return jax.tree.map(lambda label: label in frozen, labels(params))

  transforms = {k: optax.set_to_zero() if v == 0 else adamw(v) for k, v in multipliers.items()}
  transforms["default"] = adamw(1.0)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask),  # frozen: out of the clip's global norm
      optax.clip_by_global_norm(config.clip_norm),
      optax.multi_transform(transforms, labels),
  )
  return tx, schedule
