"""Expert parallelism of the sparse FFN (mm1_jax/moe.py) on the 8 simulated CPU devices
(tests/conftest.py): with a mesh whose expert axis is 2, 4 or 8, MoEMLP runs inside a
shard_map and exchanges tokens with all-to-alls; its outputs, gradients and auxiliary
statistics must equal the no-mesh (one device) result, with padding present."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import decoder, moe, sharding

B, T, D, F, E, K = 8, 6, 16, 32, 8, 2
# (data, fsdp, tensor, expert): tokens over data x fsdp x expert; tokens over expert only
# with each expert's hidden width split over tensor (a psum); all eight devices on experts.
MESHES = [(2, 2, 1, 2), (1, 1, 2, 4), (1, 1, 1, 8)]


def _valid(b=B):
  valid = np.ones((b, T), bool)
  valid[0, [1, 3]] = False
  valid[b - 1] = False  # a row of padding only
  if b > 3:
    valid[3, :4] = False
  return valid


def _layer(dispatch):
  # Factor 1.25: 2 slots an expert for 12 assignments a row, so capacity dispatch drops.
  cfg = moe.MoEConfig(num_experts=E, top_k=K, every=1, dispatch=dispatch, capacity_factor=1.25)
  return moe.MoEMLP(cfg, mlp_dim=F)


def _inputs(layer, b=B, seed=0):
  kx, kp = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (b, T, D), jnp.float32)
  params = nn.unbox(jax.jit(layer.init)(kp, x, _valid(b))["params"])
  # A larger router spread than the default init: routing depends clearly on the token.
  return x, dict(params, router=params["router"] * 20.0)


def _loss_fn(layer, valid):
  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, valid, mutable=[moe.AUX_COLLECTION])
    stats = moe.summarize_aux(aux[moe.AUX_COLLECTION])
    # Real rows only, through a nonlinearity (distinct cotangents), plus the aux losses.
    value = jnp.sum(jnp.sin(y) * valid[..., None]) + stats["load_balance"] + 1e-3 * stats["router_z"]
    return value, (y, stats)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _on_mesh(fn, args, shape):
  """(result, compiled HLO text) of jit(fn)(*args) under a mesh of the given shape and the rules."""
  mesh_cfg = sharding.MeshConfig(shape=shape)
  with jax.set_mesh(sharding.make_mesh(mesh_cfg)), nn.logical_axis_rules(mesh_cfg.rules):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled(*args), compiled.as_text()


def _assert_same(got, want):
  (_, (y, stats)), grads = got
  (_, (y0, stats0)), grads0 = want
  np.testing.assert_allclose(y, y0, atol=1e-5, rtol=1e-5)
  for name in ("load_balance", "router_z", "drop_rate"):
    np.testing.assert_allclose(stats[name], stats0[name], rtol=1e-6, err_msg=name)
  for path, g, g0 in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads),
                         jax.tree.leaves(grads0)):
    np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=["expert2", "expert4_tensor2", "expert8"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_parallel_matches_one_device(dispatch, shape):
  """Output, gradients (parameters and input) and load_balance / router_z / drop_rate equal
  the no-mesh result, and the compiled program exchanges tokens with all-to-alls. Catches
  rows sent to the wrong device or slot, results returned to the wrong assignment, the
  capacity buffers' all-to-all splitting or concatenating the wrong axis, local experts
  that are not the block of the weights the device holds, a missing psum over the split
  hidden width (tensor), and padding that takes slots or is counted on some devices."""
  layer = _layer(dispatch)
  x, params = _inputs(layer)
  valid = _valid()
  fn = _loss_fn(layer, valid)
  want = jax.jit(fn)(params, x)
  got, hlo = _on_mesh(fn, (params, x), shape)
  _assert_same(got, want)
  if dispatch == "capacity":
    assert float(want[0][1][1]["drop_rate"]) > 0  # the case exercises dropping
  assert "all-to-all(" in hlo


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_batch_that_does_not_divide_the_mesh_is_padded(dispatch):
  """3 rows (18 tokens) over 8 token shards: the layer pads with invalid tokens (rows) and
  still matches one device. Catches a shard_map that needs the batch to divide, and pads
  that take expert slots or leak into the output."""
  layer = _layer(dispatch)
  x, params = _inputs(layer, b=3, seed=1)
  fn = _loss_fn(layer, _valid(3))
  _assert_same(_on_mesh(fn, (params, x), (1, 1, 1, 8))[0], jax.jit(fn)(params, x))


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_does_not_affect_real_tokens_under_expert_parallelism(dispatch):
  """Padding positions filled with other (large) values: real tokens' outputs and the aux
  statistics do not change, and padding's own output is zero (dropless: never computed).
  Catches padding that is routed and takes an expert's slot or group, and padding counted
  in the statistics on some device."""
  layer = _layer(dispatch)
  x, params = _inputs(layer, seed=2)
  valid = _valid()
  noise = 100.0 * jax.random.normal(jax.random.PRNGKey(3), x.shape)
  x_other = jnp.where(valid[..., None], x, noise)
  fn = lambda p, v: layer.apply({"params": p}, v, valid, mutable=[moe.AUX_COLLECTION])
  (y, aux), _ = _on_mesh(fn, (params, x), (1, 2, 1, 4))
  (y_other, aux_other), _ = _on_mesh(fn, (params, x_other), (1, 2, 1, 4))
  np.testing.assert_allclose(y[valid], y_other[valid], atol=1e-6)
  assert not np.any(np.asarray(y)[~valid])
  stats, stats_other = (moe.summarize_aux(a[moe.AUX_COLLECTION]) for a in (aux, aux_other))
  for name in stats:
    np.testing.assert_allclose(stats[name], stats_other[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", [None, (1, 2, 1, 4)], ids=["no_mesh", "expert4"])
def test_dropless_groups_hold_only_real_assignments(monkeypatch, shape):
  """Every grouped matmul's group sizes, recorded per call (per device with a mesh): they
  sum to the real assignments (valid tokens x top_k) over all devices, not B x T x top_k,
  and with a mesh each device's matmul has E / 4 groups (its local experts). Catches
  padding computed by the experts, assignments lost or counted twice in the exchange, and
  a device running all E experts (all-gather rather than expert parallelism)."""
  calls = []
  real = jax.lax.ragged_dot

  def recording(lhs, rhs, group_sizes, impl="xla"):
    jax.debug.callback(lambda s, rows: calls.append((int(s.sum()), len(s), rows)), group_sizes,
                       lhs.shape[0])
    return real(lhs, rhs, group_sizes)

  layer = _layer("dropless")
  x, params = _inputs(layer)
  monkeypatch.setattr(moe, "_grouped_matmul", recording)
  valid = _valid()
  fn = lambda p, v: layer.apply({"params": p}, v, valid, mutable=[moe.AUX_COLLECTION])[0]
  if shape is None:
    jax.block_until_ready(jax.jit(fn)(params, x))
    devices, groups = 1, E
  else:
    jax.block_until_ready(_on_mesh(fn, (params, x), shape)[0])
    devices, groups = 8, E // 4
  jax.effects_barrier()
  assert len(calls) == 3 * devices  # gate, up, down on every device
  assert {n for _, n, _ in calls} == {groups}
  assert sum(s for s, _, _ in calls) == 3 * int(valid.sum()) * K < 3 * B * T * K


@pytest.mark.slow
@pytest.mark.parametrize("dispatch, shape", [("dropless", (2, 1, 1, 4)), ("capacity", (1, 1, 2, 4))])
def test_sparse_decoder_forward_and_grad_match_one_device(dispatch, shape):
  """A 2-layer all-sparse decoder (scanned blocks) with padding: logits and parameter
  gradients on an expert mesh equal the no-mesh ones. Catches the shard_map failing under
  nn.scan, or the ambient mesh / rules not reaching the layer inside the stack."""
  moe_cfg = moe.MoEConfig(num_experts=E, top_k=K, every=1, dispatch=dispatch, capacity_factor=1.25)
  cfg = decoder.DecoderConfig(vocab_size=64, width=D, depth=2, num_heads=2, num_kv_heads=2, head_dim=8,
                              mlp_dim=F, moe=moe_cfg, attention_chunks=1)
  model = decoder.Decoder(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (B, T), 0, 64)
  valid = jnp.asarray(_valid())
  mask = jnp.tril(jnp.ones((T, T), bool))[None, None] & valid[:, None, None, :]
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(5), jnp.zeros((B, T, D)), mask, positions,
                               valid=valid)["params"])

  def loss(p):
    x = model.apply({"params": p}, tokens, method=decoder.Decoder.embed)
    logits, _ = model.apply({"params": p}, x, mask, positions, valid=valid)
    return jnp.sum(jnp.sin(logits) * valid[..., None]), logits

  fn = jax.value_and_grad(loss, has_aux=True)
  (_, logits0), grads0 = jax.jit(fn)(params)
  ((_, logits), grads), _ = _on_mesh(fn, (params,), shape)
  np.testing.assert_allclose(logits[np.asarray(valid)], logits0[np.asarray(valid)], atol=1e-5, rtol=1e-5)
  for path, g, g0 in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads),
                         jax.tree.leaves(grads0)):
    np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


def test_without_expert_axis_no_all_to_all():
  """Expert axis 1 (data=8): each device runs all experts on its own tokens, with no
  all-to-all, and still matches one device. Catches an exchange (or a failing shard_map)
  where there is no expert axis to exchange over."""
  layer = _layer("dropless")
  x, params = _inputs(layer)
  fn = _loss_fn(layer, _valid())
  got, hlo = _on_mesh(fn, (params, x), (8, 1, 1, 1))
  _assert_same(got, jax.jit(fn)(params, x))
  assert "all-to-all(" not in hlo

