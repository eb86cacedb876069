"""The preflight's correction for ops libtpu's cost model cannot cost (mm1_jax/aot.py).

On v5p, XLA offloads some scatters (the gradient of the MoE router's top_k among them) to
the SparseCores; the cost model counts each PrepareAsyncCallStart / PrepareAsyncCallDone
custom call that prepares such a call as -1.0 s, which made every MoE costing point negative.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm1_jax import aot

REPO = Path(__file__).resolve().parent.parent

# The shape of an offloaded scatter-add in a compiled v5p program (abridged from a real
# `compiled.as_text()`): an inner call-start inside the called computation (not prepared,
# not counted), and the entry's prepared call on the SparseCore thread.
HLO = textwrap.dedent("""\
  %called_computation (param_0.13: f32[32768], param_1.27: s32[1024], param_2.28: f32[1024], param_3.1: token[]) -> f32[32768] {
    %inner.call-start = ((f32[32768]{0:T(1024)}, s32[1024]{0:T(1024)}, f32[1024]{0:T(1024)}), f32[32768]{0:T(1024)}, u32[]{:S(8)}) call-start(%param_0.13, %param_1.27, %param_2.28), async_execution_thread="sparsecore", to_apply=%called_computation.1
    ROOT %inner.call-done = f32[32768]{0:T(1024)} call-done(%inner.call-start)
  }

  ENTRY %main.486_spmd (param.31: s32[], param.73: f32[729,8]) -> f32[] {
    %prepare_start_scatter_offload_async_start = s32[]{:S(2)} custom-call(), custom_call_target="PrepareAsyncCallStart", backend_config={"flag_configs":[]}
    %top_k.3 = (f32[1,512,64]{1,2,0:T(8,128)}, s32[1,512,64]{1,2,0:T(8,128)}) sort(%get-tuple-element.3370, %iota.110), dimensions={2}
    %all_to_all.76 = bf16[64,1,16,256]{3,2,1,0:T(8,128)(2,1)} all-to-all(%copy.2684), channel_id=1
    %custom-call.1 = s32[512,2]{1,0:T(8,128)} custom-call(%concatenate.74), custom_call_target="GatherScatterIndicesBitpacked"
    %prepare_done_scatter_offload_async_start = token[] custom-call(%prepare_start_scatter_offload_async_start), custom_call_target="PrepareAsyncCallDone", backend_config={"flag_configs":[]}
    %scatter_offload_async_start = ((f32[32768]{0:T(1024)}, s32[1024]{0:T(1024)}, f32[1024]{0:T(1024)}, token[]), f32[32768]{0:T(1024)}) call-start(%bitcast.3290, %get-tuple-element.2848, %get-tuple-element.2849, %prepare_done_scatter_offload_async_start), async_execution_thread="sparsecore", to_apply=%called_computation, backend_config={"flag_configs":[]}
    %scatter_offload_async_done = f32[32768]{0:T(1024)} call-done(%scatter_offload_async_start)
    ROOT %r = f32[] constant(0)
  }
  """)
CALL_BYTES = 2 * 32768 * 4 + 2 * 1024 * 4  # operands read and result written


def test_uncostable_ops_counts_the_prepare_calls_and_prices_the_prepared_call_only():
  """Catches counting the wrong ops (the collectives, sorts or other custom calls of an MoE
  layer), counting the unprepared inner call-start as a second offload, or misreading its
  shapes' bytes."""
  ops = aot.uncostable_ops(HLO)
  assert ops == {"sentinel_ops": 2, "sparsecore_calls": 1, "sparsecore_bytes": CALL_BYTES}
  two = HLO.replace("ROOT %r", HLO.split("ENTRY")[1].split("\n", 1)[1].split("ROOT %r")[0] + "  ROOT %r")
  assert aot.uncostable_ops(two)["sentinel_ops"] == 4
  assert aot.uncostable_ops("ENTRY %m () -> f32[] {\n  ROOT %r = f32[] constant(0)\n}") == {
      "sentinel_ops": 0, "sparsecore_calls": 0, "sparsecore_bytes": 0}


def test_cost_correction_adds_the_sentinels_back_and_the_bytes_over_bandwidth():
  c = aot.cost_correction({"sentinel_ops": 2, "sparsecore_calls": 1, "sparsecore_bytes": 2765e6}, 2765e9)
  assert c["sentinel_seconds_added_back"] == 2.0
  assert c["sparsecore_estimate_seconds"] == pytest.approx(1e-3)
  assert c["seconds"] == pytest.approx(2.001)



def test_extrapolated_cost_corrects_each_point_before_extrapolating():
  """Synthetic costing points in the shape of MM1-3B-MoE's (28 decoder layers, a sparse FFN
  every 2nd, 32 encoder layers): the raw times are negative at every point, as libtpu
  reported them. Catches a correction applied after extrapolation (the sentinels would then
  be scaled by the layer ratio: 14 sparse layers' worth, not one point's), a sentinel count
  taken from the wrong point, or a point left uncorrected (the result would stay None)."""
  import dataclasses

  from mm1_jax import decoder as decoder_lib
  from mm1_jax import moe as moe_lib
  from mm1_jax import model as model_lib
  from mm1_jax import vit as vit_lib

  config = model_lib.MM1Config(encoder=vit_lib.ViTConfig(depth=32),
                               decoder=decoder_lib.DecoderConfig(depth=28, moe=moe_lib.MoEConfig(every=2)))
  # True per-chip seconds: 0.3 at (2, 2), +0.06 per 2 encoder layers, +0.2 per 2 decoder layers;
  # each sparse layer adds 2 sentinels (fwd offload: PrepareAsyncCallStart + Done) and 1 MiB.
  true = {(2, 2): 0.3, (4, 2): 0.36, (2, 4): 0.5}
  sparse = {(2, 2): 1, (4, 2): 1, (2, 4): 2}
  bw = 2**20 / 1e-3  # 1 MiB costs 1 ms

  def compile_fn(cfg):
    key = (cfg.encoder.depth, cfg.decoder.depth)
    assert not cfg.encoder.scan_layers and not cfg.decoder.scan_layers
    n = sparse[key]
    ops = {"sentinel_ops": 2 * n, "sparsecore_calls": n, "sparsecore_bytes": n * 2**20}
    return aot.Compiled(None, 1e12 * sum(key), true[key] - 2.0 * n, uncostable=ops)

  est = aot.extrapolated_cost(config, compile_fn, hbm_bandwidth=bw)
  want = 0.3 + 15 * 0.06 + 13 * 0.2 + 14 * 1e-3
  assert est["optimal_seconds"] == pytest.approx(want, rel=1e-9)
  assert est["correction"]["sentinel_ops"] == pytest.approx(28)  # 14 sparse layers x 2
  assert est["correction"]["sparsecore_estimate_seconds"] == pytest.approx(14e-3)
  assert [p["optimal_seconds"] < 0 for p in est["points"]] == [True] * 3
  assert [p["corrected_seconds"] for p in est["points"]] == pytest.approx([0.301, 0.361, 0.502])
  # By part: 32 encoder layers at 0.03 s, 28 decoder layers at 0.1 s + 1 ms a sparse layer
  # pair's offload; the rest is the (2, 2) point less its 2 + 2 layers.
  split = est["split"]
  assert split["image_encoder_seconds"] == pytest.approx(32 * 0.03)
  assert split["decoder_seconds"] == pytest.approx(28 * (0.2 + 1e-3) / 2)
  assert split["rest_seconds"] == pytest.approx(want - 32 * 0.03 - 14 * (0.2 + 1e-3))
  # Without the chip's bandwidth nothing is corrected: no projection, as before.
  assert aot.extrapolated_cost(config, compile_fn)["optimal_seconds"] is None
  # A dense model's points carry no correction.
  dense = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, moe=None))
  clean = lambda cfg: aot.Compiled(None, 1.0, 0.1 * (cfg.encoder.depth + cfg.decoder.depth),  # noqa: E731
                                   uncostable={"sentinel_ops": 0, "sparsecore_calls": 0, "sparsecore_bytes": 0})
  est = aot.extrapolated_cost(dense, clean, hbm_bandwidth=bw)
  assert est["correction"] is None and est["optimal_seconds"] == pytest.approx(0.1 * 60)


SCRIPT = """
import json, os
os.environ["TPU_SKIP_MDS_QUERY"] = "1"
import jax, jax.numpy as jnp
from jax.experimental import topologies
from mm1_jax import aot

dev = topologies.get_topology_desc(platform="tpu", topology_name="v5:2x2x1").devices[0]
sh = jax.sharding.SingleDeviceSharding(dev)
x = jax.ShapeDtypeStruct((1, 512, 64), jnp.float32, sharding=sh)
grad = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 2)[0] ** 2))  # top_k's gradient: a scatter-add
out = {}
for name, opts in (("offloaded", None), ("on_tensorcore", {"xla_tpu_enable_offloading_scatter_to_sparsecore": False})):
  lowered = jax.jit(grad).lower(x)
  c = lowered.compile(compiler_options=opts) if opts else lowered.compile()
  out[name] = {"seconds": c.cost_analysis()["optimal_seconds"], "ops": aot.uncostable_ops(c.as_text())}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.libtpu
def test_a_sparsecore_scatter_costs_two_sentinels_on_v5p():
  """The router's top_k gradient compiled for a v5p chip: offloaded to a SparseCore it is
  costed at about -2.0 s, with two sentinel custom calls found in its text; compiled on the
  TensorCore it is costed positive and small, and the corrected offloaded time agrees with
  it to within a millisecond. Catches a libtpu whose sentinel or offload changed."""
  import json

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  off, tc = r["offloaded"], r["on_tensorcore"]
  assert off["ops"]["sentinel_ops"] == 2 and off["ops"]["sparsecore_calls"] == 1
  assert off["seconds"] == pytest.approx(-2.0, abs=1e-3)
  assert tc["ops"]["sentinel_ops"] == 0 and 0 < tc["seconds"] < 1e-3
  corrected = off["seconds"] + aot.cost_correction(off["ops"], aot.CHIPS["v5p"].hbm_bandwidth)["seconds"]
  assert 0 < corrected == pytest.approx(tc["seconds"], abs=1e-3)


def test_preflight_table_marks_a_corrected_step_time(tmp_path):
  """Catches a corrected MFU shown in RESULTS.md as if the cost model had given it."""
  import json

  sys.path.insert(0, str(REPO))
  from benchmarks import preflight

  figures = {"mesh": {"data": 1, "fsdp": 16, "tensor": 1, "expert": 8}, "projected_mfu": 0.25,
             "projected_mfu_slots": 0.35, "tokens_per_s_per_chip": 3000.0, "useful_tokens_per_s_per_chip": 2000.0,
             "per_chip_bytes": 50 * 2**30, "hbm_bytes": 95 * 2**30, "params_total": 64e9, "params_active": 4.5e9,
             "topology": "v5p-256", "num_chips": 128, "fits": True, "compile_s": 400.0, "cost_compile_s": 1400.0}
  for name, extra in (("plain", {}), ("moe", {"cost_correction": {"sentinel_ops": 28.0}})):
    rec = {"commit": "0" * 40, "dirty": False, "figures": {**figures, **extra, "preset": f"gin/pods/{name}.gin"}}
    (tmp_path / f"{name}.json").write_text(json.dumps(rec))
  rows = {line.split("|")[1].strip(): line for line in preflight.table(tmp_path).splitlines() if "gin`" in line}
  assert "25.0% (35.0%) \\* (28 sentinels)" in rows["`moe.gin`"]
  assert "25.0% (35.0%) |" in rows["`plain.gin`"]
  assert "cost_correction" in preflight.table(tmp_path).splitlines()[-1]
