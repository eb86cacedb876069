"""The megablox grouped matmul (mm1_jax/gmm.py), interpreted on CPU, against
jax.lax.ragged_dot: values and gradients, alone and as the dropless MoE's experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax import gmm, moe, sharding

pytest.importorskip("tokamax")


def _grads(matmul, lhs, rhs, cotangent):
  return jax.jit(jax.value_and_grad(lambda a, w: jnp.sum(matmul(a, w) * cotangent), argnums=(0, 1)))(lhs, rhs)


def test_grouped_matmul_matches_ragged_dot_with_empty_groups_and_ungrouped_rows():
  """640 rows (not a multiple of the 512-row tile), an empty group and 90 rows in no group:
  catches a wrong transposition or tiling in either backward kernel, and padded or ungrouped
  rows that come out as anything but zeros."""
  kl, kr, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  lhs = jax.random.normal(kl, (640, 128), jnp.float32)
  rhs = jax.random.normal(kr, (4, 128, 256), jnp.float32)
  sizes = jnp.array([100, 0, 300, 150], jnp.int32)
  cotangent = jax.random.normal(kc, (640, 256), jnp.float32)
  got = jax.jit(lambda a, w: gmm.grouped_matmul(a, w, sizes))(lhs, rhs)
  want = jax.lax.ragged_dot(lhs, rhs, sizes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert not np.any(np.asarray(got)[550:])
  (v, (dl, dr)) = _grads(lambda a, w: gmm.grouped_matmul(a, w, sizes), lhs, rhs, cotangent)
  (v0, (dl0, dr0)) = _grads(lambda a, w: jax.lax.ragged_dot(a, w, sizes), lhs, rhs, cotangent)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  np.testing.assert_allclose(dl, dl0, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(dr, dr0, rtol=1e-5, atol=1e-3)
  assert not np.any(np.asarray(dl)[550:])  # no gradient reaches rows in no group


@pytest.mark.parametrize("k", [64, 200])
def test_widths_off_the_lane_grid_are_refused(k):
  with pytest.raises(ValueError, match="multiples of 128"):
    gmm.grouped_matmul(jnp.ones((128, k)), jnp.ones((2, k, 128)), jnp.array([64, 64], jnp.int32))


@pytest.mark.parametrize("kwargs", [dict(dispatch="dropless", grouped_matmul="megablox"),
                                    dict(dispatch="capacity", grouped_matmul="pallas")])
def test_unknown_or_inapplicable_grouped_matmul_is_refused(kwargs):
  with pytest.raises(ValueError, match="grouped_matmul"):
    moe.MoEConfig(**kwargs)


@pytest.mark.parametrize("mesh", [(1, 4, 1, 2), (1, 2, 2, 2)], ids=["fsdp4_expert2", "fsdp2_tensor2_expert2"])
def test_dropless_moe_through_the_kernels_matches_ragged_dot_under_expert_parallelism(mesh):
  """MoEMLP with grouped_matmul='pallas' on expert-parallel meshes (the all-to-all path, whose
  empty slots are in no group; with tensor 2 each device holds half of every expert's width
  and the down projection's partial sums are psum-ed) against 'xla': output, router and expert
  gradients; and the kernels really are in the program (a setting that did not reach the
  experts would pass the comparison trivially)."""
  b, t, d, f = 4, 32, 128, 256
  valid = np.ones((b, t), bool)
  valid[1, 20:] = False
  x = jax.random.normal(jax.random.PRNGKey(1), (b, t, d), jnp.float32)
  layers = {impl: moe.MoEMLP(moe.MoEConfig(num_experts=4, top_k=2, every=1, dispatch="dropless",
                                           grouped_matmul=impl), mlp_dim=f) for impl in ("xla", "pallas")}
  params = nn.unbox(jax.jit(layers["xla"].init)(jax.random.PRNGKey(2), x, valid)["params"])
  params = dict(params, router=params["router"] * 20.0)

  def loss(layer):
    def fn(p, x):
      y = layer.apply({"params": p}, x, valid, mutable=[moe.AUX_COLLECTION])[0]
      return jnp.sum(jnp.sin(y) * valid[..., None])
    return jax.value_and_grad(fn, argnums=(0, 1))

  mesh_cfg = sharding.MeshConfig(shape=mesh)
  out = {}
  with jax.set_mesh(sharding.make_mesh(mesh_cfg)), nn.logical_axis_rules(mesh_cfg.rules):
    for impl, layer in layers.items():
      out[impl] = jax.jit(loss(layer))(params, x)
    program = str(jax.make_jaxpr(loss(layers["pallas"]))(params, x))
  # The kernels run every grouped matmul, forward and backward: no ragged_dot is left.
  assert "pallas_call" in program and "ragged_dot" not in program
  (v, (gp, gx)), (v0, (gp0, gx0)) = out["pallas"], out["xla"]
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  np.testing.assert_allclose(gx, gx0, rtol=1e-4, atol=1e-5)
  for path, g, g0 in zip(jax.tree_util.tree_leaves_with_path(gp0), jax.tree.leaves(gp), jax.tree.leaves(gp0)):
    np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path[0]))
