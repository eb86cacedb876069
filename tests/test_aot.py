"""mm1-aot: the train step compiled for real TPU topologies by libtpu on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm1_jax import aot

REPO = Path(__file__).resolve().parent.parent
KEYS = ("topology", "num_chips", "num_slices", "per_chip_bytes", "hbm_bytes", "fits", "model_flops_per_step",
        "xla_flops", "optimal_seconds", "tokens_per_step", "projected_mfu", "params_total", "params_active")


@pytest.mark.parametrize("name, chips, topology", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-128", 64, "v4:4x4x4"), ("v5p-8", 4, "v5:2x2x1"), ("v5p-256", 128, "v5:4x4x8"),
    ("v5p-1024", 512, "v5:8x8x8"), ("v5litepod-1", 1, "v5e:1x1"), ("v5litepod-256", 256, "v5e:16x16"),
    ("v6e-64", 64, "v6e:8x8"),
])
def test_accelerator_type_names(name, chips, topology):
  t = aot.parse_topology(name)
  assert (t.num_chips, t.topology_name) == (chips, topology)


@pytest.mark.parametrize("bad", ["v5p-6", "v5p", "v7-8", "tpu-8", "v6e-3"])
def test_unknown_topologies_are_refused(bad):
  with pytest.raises(ValueError, match="topology|slice"):
    aot.parse_topology(bad)


def _quickstart_config():
  import gin

  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(REPO))
  gin.parse_config_files_and_bindings(["gin/experiments/quickstart.gin"], [])
  config = gin.query_parameter("%MODEL").scoped_configurable_fn()
  gin.clear_config(clear_constants=True)
  return config


def _aot(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, "-m", "mm1_jax.aot", "--gin_file=gin/experiments/quickstart.gin",
                         f"--json_out={out}", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1200)
  return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def v5p_8_report(tmp_path_factory):
  """mm1-aot with costs for v5p-8, half of every row assumed padding (compiled once)."""
  tmp = tmp_path_factory.mktemp("aot")
  proc, r = _aot(tmp, "--topology=v5p-8", "--gin.BATCH_SIZE=16", "--gin.PREFLIGHT_PADDING_FRACTION=0.5",
                 f"--hlo_dir={tmp / 'hlo'}")
  return proc, r, tmp / "hlo"


@pytest.mark.slow
@pytest.mark.libtpu
def test_preflight_report_for_a_small_topology(v5p_8_report):
  proc, r, _ = v5p_8_report
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert set(KEYS) <= set(r)
  assert (r["topology"], r["num_chips"], r["num_slices"], r["num_devices"]) == ("v5p-8", 4, 1, 4)
  assert r["hbm_bytes"] == 95 * 2**30 and r["fits"] is True
  assert 0 < r["per_chip_bytes"] < r["hbm_bytes"]
  m = r["memory"]
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  assert r["tokens_per_step"] == 16 * 128
  # The compiler's count of the whole step (extrapolated per layer from unrolled compiles)
  # agrees with the model count of every slot: the extrapolation holds.
  assert r["xla_flops"] == pytest.approx(r["model_flops_per_step"], rel=0.05)
  for key in ("topology", "chips", "per-chip memory", "fits", "projected MFU"):
    assert key in proc.stdout
  assert r["params_total"] == r["params_active"] > 4e6
  # --hlo_dir: the step and each costing compile, as the TPU compiler optimised them.
  hlo = v5p_8_report[2]
  names = {f"cost_encoder{p['encoder_layers']}_decoder{p['decoder_layers']}.hlo.txt" for p in r["cost_points"]}
  assert {f.name for f in hlo.iterdir()} == names | {"step.hlo.txt"}
  assert all(f.read_text().startswith("HloModule") for f in hlo.iterdir())


@pytest.mark.slow
@pytest.mark.libtpu
def test_preflight_mfu_is_the_compilers_work_over_four_v5p_chips(v5p_8_report):
  """Catches a wrong peak (another chip's), devices taken for chips, per-device FLOPs taken
  for the whole step, or padding counted as useful work: the every-slot MFU times
  4 chips x 459 TFLOP/s (v5p's datasheet bf16 peak) x the roofline time must give back the
  compiler's own FLOP count, and the useful MFU must scale with the real tokens of a batch
  half of whose positions are padding (counted by flops.batch_work, another path)."""
  import numpy as np

  from mm1_jax import flops
  from mm1_jax.params import abstract_params

  proc, r, _ = v5p_8_report
  assert proc.returncode == 0, proc.stderr[-3000:]
  t = r["optimal_seconds"]
  assert 0 < r["projected_mfu"] < r["projected_mfu_slots"] < 1
  assert r["projected_mfu_slots"] * 4 * 459e12 * t == pytest.approx(r["xla_flops"], rel=0.05)
  config = _quickstart_config()
  seg = np.zeros((16, 128), np.int32)
  seg[:, :64] = 1  # half of every row is real
  tokens = np.full((16, 128), 7)
  tokens[:, :4 * config.tokens_per_image] = config.image_token_id  # 4 images a row, as the slots
  batch = {"segment_ids": seg, "tokens": tokens, "images": np.zeros((16, 4, 1, 1, 3), np.uint8)}
  useful = flops.useful_train_flops(abstract_params(config), config, batch)
  assert r["projected_mfu"] / r["projected_mfu_slots"] == pytest.approx(useful / r["model_flops_per_step"],
                                                                        rel=1e-6)


@pytest.mark.slow
@pytest.mark.libtpu
def test_preflight_refuses_a_step_that_does_not_fit(tmp_path):
  proc, r = _aot(tmp_path, "--topology=v5litepod-1", "--no_cost", "--gin.BATCH_SIZE=512", "--gin.SEQ_LEN=4096")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert r["fits"] is False and r["hbm_bytes"] == 16 * 2**30
  assert "NO" in proc.stdout


@pytest.mark.slow
@pytest.mark.libtpu
def test_unknown_topology_is_a_clear_error(tmp_path):
  proc, _ = _aot(tmp_path, "--topology=v5p-7")
  assert proc.returncode == 2 and "no v5p slice of that size" in proc.stderr
  assert "Traceback" not in proc.stderr


MM1_PODS = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin" / "pods").glob("mm1_*.gin"))


@pytest.mark.slow
@pytest.mark.libtpu
@pytest.mark.parametrize("pod", MM1_PODS)
def test_mm1_pods_reach_the_compile_without_init_flags(pod, clean_gin, capsys):
  """mm1-aot on an MM1 pod as it ships, with none of the --gin.INIT_* flags a training
  launch passes: the pod parses, its init_from macros have values, and every argument of
  the preflight (the optimizer's peak LR, computed from the decoder, among them) is built.
  No topology is given, so it stops right there, before libtpu compiles anything."""
  code = aot.main([f"--gin_file={pod}", "--gin.TOPOLOGY=None"])
  err = capsys.readouterr().err
  assert code == 2 and "mm1-aot: no topology" in err, err[-2000:]
