"""The parts of benchmarks/tpu_levers.py and benchmarks/peer_maxtext.py that turn compiler
output into figures (the compiles themselves need libtpu and minutes: they are benchmarks)."""

import dataclasses

import pytest

import gin

from benchmarks import peer_maxtext, tpu_levers
from mm1_jax import decoder, gin_checks, moe

# The two lines MaxText's train_compile prints, as it prints them (keys abridged).
MAXTEXT_STDOUT = """Finished train_compile.py successfully!
Cost analysis: {'utilization119{}': 1.0, 'bytes accessedout{2}': 1576817152.0, 'flops': 57837015269376.0, \
'transcendentals': 2415919104.0, 'optimal_seconds': 0.19222845137119293, 'bytes accessed': 3.1e+11}
Memory analysis: CompiledMemoryStats(generated_code_size_in_bytes=128623616, argument_size_in_bytes=402212864, \
output_size_in_bytes=401891392, alias_size_in_bytes=401885184, temp_size_in_bytes=10417120576, \
host_generated_code_size_in_bytes=0, host_argument_size_in_bytes=0, host_output_size_in_bytes=0, \
host_alias_size_in_bytes=0, host_temp_size_in_bytes=0)
"""


def test_maxtext_figures_are_read_by_key():
  # Fails if a utilization or bytes entry is taken for the flops, or a host_* size for the
  # device's memory (host sizes are zero here, device sizes are not).
  got = peer_maxtext.parse_maxtext(MAXTEXT_STDOUT)
  assert got["flops"] == 57837015269376.0
  assert got["optimal_seconds"] == pytest.approx(0.19222845137119293)
  m = got["memory"]
  assert (m["argument"], m["temp"], m["generated_code"]) == (402212864, 10417120576, 128623616)
  assert m["total"] == 402212864 + 401891392 - 401885184 + 10417120576 + 128623616


def test_maxtext_output_without_analyses_gives_no_figures():
  assert peer_maxtext.parse_maxtext("Jitting and compiling train step...\nTraceback ...") == {}


def test_levers_are_compared_with_the_first_one_run():
  levers = {"splash": {"tokens_per_s_per_chip": 6000.0, "per_chip_bytes": 18 * 2**30},
            "base": {"tokens_per_s_per_chip": 5000.0, "per_chip_bytes": 24 * 2**30},
            "oom": {"tokens_per_s_per_chip": None, "per_chip_bytes": None}}
  got = tpu_levers.compare(levers)
  assert got["splash"] == {"against": "splash", "tokens_per_s_ratio": 1.0, "memory_ratio": 1.0}
  assert got["base"]["tokens_per_s_ratio"] == pytest.approx(5000 / 6000, abs=1e-3)
  assert got["base"]["memory_ratio"] == pytest.approx(24 / 18, abs=1e-3)
  assert got["oom"] == {"against": "splash"}  # nothing to compare: no ratio invented


def test_every_lever_and_study_names_real_bindings():
  # A typo in a binding would only show minutes into a compile; the names must be gin
  # configurables' fields or macros of the pod files.
  fields = {f"decoder.DecoderConfig.{f.name}" for f in dataclasses.fields(decoder.DecoderConfig)}
  fields |= {f"moe.MoEConfig.{f.name}" for f in dataclasses.fields(moe.MoEConfig)}
  for name, bindings in tpu_levers.LEVERS.items():
    for b in bindings:
      assert b.split("=")[0] in fields, (name, b)
  for study, (gin_files, bindings) in tpu_levers.STUDIES.items():
    text = "".join((tpu_levers.REPO / f).read_text() for f in [*gin_files, "gin/runs/pretrain.gin"])
    for b in bindings:
      key = b.split("=")[0]
      if key.startswith("decoder.DecoderConfig."):
        assert key in fields, (study, b)
      else:
        assert f"{key} =" in text, (study, b)


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("study, lever", [(s, lever) for s in tpu_levers.STUDIES for lever in tpu_levers.levers_for(s)])
def test_each_lever_parses_on_its_study_and_takes_effect(study, lever):
  """What mm1-aot parses for the lever (gin files, then bindings) gives a model whose decoder
  has the lever's values: an MoE lever offered to a dense study fails to parse, and a binding
  that later gin overrides (or that reaches no configurable) would compile the base twice."""
  files, bindings = tpu_levers.STUDIES[study]
  gin_checks.parse(files, bindings + tpu_levers.LEVERS[lever], [str(tpu_levers.REPO)])
  dec = gin.query_parameter("%MODEL").scoped_configurable_fn().decoder
  expected = dict(b.split("=") for b in bindings + tpu_levers.LEVERS[lever] if b.startswith(("decoder.", "moe.")))
  for key, value in expected.items():  # the study's own (the text studies' remat), then the lever's
    owner = dec.moe if key.startswith("moe.") else dec
    assert getattr(owner, key.rsplit(".", 1)[1]) == value.strip("'"), (study, lever, key, value)
