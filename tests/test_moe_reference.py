"""The sparse FFN (mm1_jax/moe.py) against a plain numpy reference: a loop over tokens and
their chosen experts, written from the routing and capacity rules, not from the einsums."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import moe

B, T, D, F, E, K = 2, 12, 16, 32, 4, 2


def _silu(z):
  return z / (1.0 + np.exp(-z))


def _reference(x, params, cfg: moe.MoEConfig, valid):
  """(y [B, T, D], dropped real assignments, real assignments), token by token in float64.

  Capacity dispatch: each row is a group with C = cfg.capacity(T) slots per expert; the
  row's assignments are visited as all first choices in token order, then all second
  choices, ...; an assignment keeps its place when fewer than C of the earlier ones went
  to its expert. Padding tokens are not visited."""
  x = np.asarray(x, np.float64)
  router, gate, up, down = (np.asarray(params[n], np.float64) for n in ("router", "gate", "up", "down"))
  b, t, _ = x.shape
  y = np.zeros_like(x)
  choices = np.zeros((b, t, cfg.top_k), int)
  weights = np.zeros((b, t, cfg.top_k))
  for i in range(b):
    for j in range(t):
      logits = x[i, j] @ router
      p = np.exp(logits - logits.max())
      p /= p.sum()
      top = sorted(range(len(p)), key=lambda e: -p[e])[:cfg.top_k]
      choices[i, j] = top
      weights[i, j] = [p[e] / sum(p[f] for f in top) for e in top]
  kept = np.ones((b, t, cfg.top_k), bool)
  dropped = real = 0
  if cfg.dispatch == "capacity":
    cap = math.ceil(cfg.capacity_factor * t / cfg.num_experts)
    for i in range(b):
      taken = [0] * cfg.num_experts
      for r in range(cfg.top_k):
        for j in range(t):
          if not valid[i, j]:
            continue
          e = choices[i, j, r]
          kept[i, j, r] = taken[e] < cap
          taken[e] += 1
          real += 1
          dropped += not kept[i, j, r]
  for i in range(b):
    for j in range(t):
      for r in range(cfg.top_k):
        if kept[i, j, r]:
          e = choices[i, j, r]
          h = _silu(x[i, j] @ gate[e]) * (x[i, j] @ up[e])
          y[i, j] += weights[i, j, r] * (h @ down[e])
  return y, dropped, real


def _run(cfg: moe.MoEConfig, valid=None, seed=0):
  """(x, params, y, drop_rate) of MoEMLP at float32 on random inputs."""
  kx, kp = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (B, T, D), jnp.float32)
  layer = moe.MoEMLP(cfg, mlp_dim=F, dtype=jnp.float32)
  params = nn.unbox(jax.jit(layer.init)(kp, x, valid)["params"])
  # A larger router spread than the default init: routing then depends clearly on the token.
  params = dict(params, router=params["router"] * 20.0)
  y, aux = layer.apply({"params": params}, x, valid, mutable=[moe.AUX_COLLECTION])
  drop_rate = float(moe.summarize_aux(aux[moe.AUX_COLLECTION])["drop_rate"])
  return np.asarray(x), {k: np.asarray(v) for k, v in params.items()}, np.asarray(y), drop_rate


def _config(dispatch, capacity_factor=2.0):
  return moe.MoEConfig(num_experts=E, top_k=K, every=1, dispatch=dispatch, capacity_factor=capacity_factor)


@pytest.mark.slow
def test_dropless_matches_the_per_token_reference():
  """Every assignment computed: catches the grouped matmul scattering an expert's output
  back to the wrong token or choice (the sort/unsort of `_dropless`), a missing
  renormalisation of the top-k weights, or wrong experts from the router."""
  cfg = _config("dropless")
  valid = np.ones((B, T), bool)
  x, params, y, drop_rate = _run(cfg)
  want, _, _ = _reference(x, params, cfg, valid)
  np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
  assert drop_rate == 0.0


def test_capacity_with_drops_matches_the_reference():
  """C = ceil(1.25 * 12 / 4) = 4 slots for 24 assignments a row: some are dropped. Catches
  a wrong slot priority (choices interleaved per token instead of all first choices
  first, or later tokens first), a capacity that multiplies in top_k, dropped assignments
  still added to the output, and a drop rate counted over the wrong denominator."""
  cfg = _config("capacity", capacity_factor=1.25)
  valid = np.ones((B, T), bool)
  x, params, y, drop_rate = _run(cfg)
  want, dropped, real = _reference(x, params, cfg, valid)
  assert real == B * T * K and 0 < dropped < real  # the case exercises dropping
  np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
  assert round(drop_rate * real) == dropped
  assert np.float32(drop_rate) == np.float32(dropped / real)


def test_capacity_without_drops_matches_the_reference_and_dropless():
  """C = T slots: no assignment can be dropped, so capacity dispatch must equal the
  dropless path and the reference. Catches a combine that weights the slots wrongly or
  loses assignments even when they fit, and a nonzero drop rate with nothing dropped."""
  cfg = _config("capacity", capacity_factor=float(E))
  valid = np.ones((B, T), bool)
  x, params, y, drop_rate = _run(cfg, seed=1)
  want, dropped, real = _reference(x, params, cfg, valid)
  assert dropped == 0 and real == B * T * K
  np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
  assert drop_rate == 0.0
  _, _, y_dropless, _ = _run(_config("dropless"), seed=1)
  np.testing.assert_allclose(y, y_dropless, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_padding_takes_no_capacity_and_stays_out_of_the_drop_rate(dispatch):
  """Padding tokens interleaved with real ones, C = 4 slots. Catches padding that takes
  expert slots (real tokens after it then dropped), and padding counted in the drop
  rate's numerator or denominator. Only real tokens' outputs are compared."""
  cfg = _config(dispatch, capacity_factor=1.25)
  valid = np.ones((B, T), bool)
  valid[0, [1, 2, 5, 8]] = False
  valid[1, :3] = False
  x, params, y, drop_rate = _run(cfg, valid=jnp.asarray(valid), seed=2)
  want, dropped, real = _reference(x, params, cfg, valid)
  np.testing.assert_allclose(y[valid], want[valid], atol=1e-4, rtol=1e-4)
  if dispatch == "capacity":
    assert real == int(valid.sum()) * K and 0 < dropped < real
    # With the padding's assignments counted as well, more of the real ones would be dropped.
    _, dropped_all, _ = _reference(x, params, cfg, np.ones((B, T), bool))
    assert dropped_all > dropped
    assert round(drop_rate * real) == dropped
    assert np.float32(drop_rate) == np.float32(dropped / real)
  else:
    assert drop_rate == 0.0


@pytest.mark.parametrize("factor, tokens, experts, want", [(2.0, 4096, 64, 128), (1.25, 12, 4, 4),
                                                          (1.0, 10, 4, 3)])
def test_capacity_is_the_factor_times_the_balanced_share(factor, tokens, experts, want):
  """capacity(T) = ceil(factor * T / E), top_k not entering: AXLearn's convention, under
  which a factor of k with top-k routing fills exactly a perfectly balanced load (2.0 with
  top-2 leaves no headroom). Catches a capacity that multiplies in top_k (256 for the
  first case) or rounds down (2 for the last)."""
  for k in (1, 2):
    cfg = moe.MoEConfig(num_experts=experts, top_k=k, capacity_factor=factor)
    assert cfg.capacity(tokens) == want


def test_dropless_gradients_match_capacity_without_drops():
  """With C = T nothing is dropped, so both dispatches compute one function and must have one
  gradient. Capacity's comes from autodiff of its einsums; dropless's sorts rows to experts and
  back through gathers with a hand-written backward (the inverse permutation, then each token's
  k copies summed): a wrong inverse or a missing sum fails here, for the input and every weight."""
  valid = np.ones((B, T), bool)
  valid[1, 7:] = False
  x = jax.random.normal(jax.random.PRNGKey(3), (B, T, D), jnp.float32)
  layers = {d: moe.MoEMLP(_config(d, capacity_factor=float(E)), mlp_dim=F, dtype=jnp.float32)
            for d in ("capacity", "dropless")}
  params = nn.unbox(jax.jit(layers["dropless"].init)(jax.random.PRNGKey(4), x, valid)["params"])
  params = dict(params, router=params["router"] * 20.0)

  def grads(layer):
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, valid, mutable=[moe.AUX_COLLECTION])[0])
                                * valid[..., None])
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  (gp, gx), (gp0, gx0) = grads(layers["dropless"]), grads(layers["capacity"])
  np.testing.assert_allclose(gx, gx0, rtol=1e-4, atol=1e-5)
  for name in ("router", "gate", "up", "down"):
    np.testing.assert_allclose(gp[name], gp0[name], rtol=1e-4, atol=1e-5, err_msg=name)
