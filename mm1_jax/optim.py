"""AdamW with linear warmup, cosine decay and global-norm clipping (MM1's recipe)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Attributes:
    peak_lr: learning rate after warmup. MM1: 6e-5 (3B), 4e-5 (7B), 2e-5 (30B).
    warmup_steps: linear warmup from 0. MM1: 2000.
    end_lr_ratio: cosine decays to peak_lr * end_lr_ratio at the last step. MM1: 0.1.
    weight_decay: decoupled; optax scales it by the current LR, so 0.1 gives MM1's
      decay of 0.1 x peak LR at the peak. Every weight matrix (MoE experts and router
      included); norms, biases and position tables are not decayed.
    clip_norm: global gradient-norm clip.
  """

  peak_lr: float = 1e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0


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


def make_optimizer(config: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=_decay_mask),
  )
  return tx, schedule
