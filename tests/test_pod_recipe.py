"""MM1's recipe in the pod files: the peak-LR law, the 30B z-loss, the pre-trained parts.

- The law (`optim.mm1_lr_law`) against the peak LRs MM1 published for its 3B, 7B and 30B
  models, and the decoder presets against the sizes they are named for.
- Every MM1 pod, parsed as mm1-train and mm1-aot parse it: its effective peak LR is the law
  of its own decoder's parameter count (counted here through `params.count_parameters` on
  the whole model, not through the pod's callable), its z-loss weight what it declares, and
  `init_from` an encoder part then a decoder part, overridable with --gin flags.
"""

import argparse
import inspect
from pathlib import Path

import gin
import pytest
from gin import config as gin_config

from mm1_jax import gin_checks, gin_cli, optim, pretrained, train
from mm1_jax.params import count_parameters

REPO = Path(__file__).resolve().parent.parent
MM1_PODS = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin" / "pods").glob("mm1_*.gin"))
ENCODER_PODS = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin" / "pods").glob("aim*.gin"))

pytestmark = pytest.mark.usefixtures("clean_gin")  # conftest.py


def _parse(files, bindings=()):
  gin_checks.parse(list(files), list(bindings), [str(REPO)])


def _model():
  return gin.query_parameter("%MODEL").scoped_configurable_fn()


def _evaluate(value):
  """A bound value with its macro / configurable references evaluated (in lists too)."""
  if isinstance(value, gin_config.ConfigurableReference):
    return value.scoped_configurable_fn()
  if isinstance(value, (list, tuple)):
    return type(value)(_evaluate(v) for v in value)
  return value


def _bound(selector: str, default):
  """The value gin gives a parameter: its binding, or the function's default when unbound."""
  try:
    return _evaluate(gin.query_parameter(selector))
  except ValueError:  # not bound in the config
    return default


# --- the law ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, published", [(3e9, 6e-5), (7e9, 4e-5), (30e9, 2e-5)])
def test_law_gives_mm1s_published_peak_lrs(n, published):
  """MM1 gives its 3B / 7B / 30B peak LRs to one significant digit (the law itself gives
  5.8e-5, 4.1e-5, 2.2e-5): a wrong constant, sign or logarithm base misses them."""
  assert float(f"{optim.mm1_lr_law(n):.0e}") == published


def test_law_refuses_a_count_that_is_not_positive():
  with pytest.raises(ValueError, match="positive"):
    optim.mm1_lr_law(0)


@pytest.mark.parametrize("model_file, size", [
    ("gin/models/mm1_3b.gin", 3e9),  # 3,015,355,392 decoder parameters
    ("gin/models/mm1_7b.gin", 7e9),  # 6,738,415,616
    ("gin/models/mm1_30b.gin", 30e9),  # 29,434,649,088
    ("gin/models/mm1_ablation.gin", 1.2e9),  # 1,213,302,784 (MM1's "1.2B" ablation decoder)
])
def test_decoder_presets_have_the_size_they_are_named_for(model_file, size):
  """The law's N for each dense preset is within 10 % of its name, and it is the decoder
  count of the whole model (encoder and connector left out, everything else counted)."""
  _parse([model_file])
  model = _model()
  n = optim.lr_law_parameters(model.decoder)
  assert abs(n / size - 1) < 0.10, f"{model_file}: {n:,} decoder parameters"
  assert n == count_parameters(model)["decoder"]


def test_mixtral_decoder_has_mixtrals_published_size():
  """Mistral AI gives Mixtral-8x7B as 46.7B parameters, 12.9B used per token: a wrong expert
  width, GQA head count, sparse-layer spacing or untied head misses one of them."""
  _parse(["gin/models/mm1_mixtral_8x7b.gin"])
  counts = count_parameters(_model())
  assert round(counts["decoder"] / 1e9, 1) == 46.7
  assert round(counts["decoder.active"] / 1e9, 1) == 12.9


@pytest.mark.parametrize("model_file", ["gin/models/mm1_3b_moe.gin", "gin/models/mm1_7b_moe.gin"])
def test_a_sparse_decoder_counts_its_active_parameters(model_file):
  """MoE: N is what a token runs (see optim.lr_law_parameters), far below the total."""
  _parse([model_file])
  counts = count_parameters(_model())
  n = optim.lr_law_parameters(_model().decoder)
  assert n == counts["decoder.active"] < counts["decoder"] / 5


# --- the MM1 pods ------------------------------------------------------------------------

def test_every_mm1_pod_is_checked():
  assert len(MM1_PODS) >= 6 and "gin/pods/mm1_ablation_v5p-64.gin" in MM1_PODS


@pytest.mark.parametrize("pod", MM1_PODS)
def test_pod_peak_lr_is_the_law_of_its_decoder(pod):
  """Both readers of the optimizer config (mm1-train, mm1-aot) get the law of the pod's own
  decoder, and PEAK_LR is the callable, not a number copied from it."""
  _parse([pod])
  ref = gin.query_parameter("%PEAK_LR")
  assert isinstance(ref, gin_config.ConfigurableReference) and ref.configurable.wrapped is optim.mm1_peak_lr, (
      f"{pod}: PEAK_LR = {ref!r}, not @optim.mm1_peak_lr()")
  expected = optim.mm1_lr_law(count_parameters(_model())["decoder.active"])
  for selector in ("train.train.optimizer", "aot.preflight.optimizer"):
    assert _evaluate(gin.query_parameter(selector)).peak_lr == pytest.approx(expected, rel=1e-12), selector


def test_pod_peak_lr_follows_a_changed_decoder():
  """The LR is computed from the decoder the pod trains, not fixed when the pod was written:
  half the layers, a higher rate, again the law of the new count."""
  _parse(["gin/pods/mm1_3b_v5p-128.gin"])
  full = _evaluate(gin.query_parameter("train.train.optimizer")).peak_lr
  gin.clear_config(clear_constants=True)
  _parse(["gin/pods/mm1_3b_v5p-128.gin"], ["decoder.DecoderConfig.depth = 14"])
  model = _model()
  assert model.decoder.depth == 14
  half = _evaluate(gin.query_parameter("train.train.optimizer")).peak_lr
  assert half > full
  assert half == pytest.approx(optim.mm1_lr_law(count_parameters(model)["decoder"]), rel=1e-12)


@pytest.mark.parametrize("pod", ENCODER_PODS)
def test_encoder_pods_keep_their_own_lr(pod):
  """The law is for MM1's decoder: the AIM / AIMv2 encoder pods set a number."""
  _parse([pod])
  assert isinstance(gin.query_parameter("%PEAK_LR"), float)


@pytest.mark.parametrize("pod", MM1_PODS)
def test_z_loss_is_mm1s_for_30b_and_off_elsewhere(pod):
  _parse([pod])
  default = inspect.signature(train.train).parameters["z_loss"].default
  expected = 1e-4 if "mm1_30b" in Path(pod).name else 0.0
  assert _bound("train.train.z_loss", default) == expected


@pytest.mark.parametrize("pod", MM1_PODS)
def test_pod_starts_from_a_pretrained_encoder_and_decoder(pod):
  """init_from names the encoder part of one folder and the decoder part of another, in the
  form pretrained.parse_source reads."""
  _parse([pod])
  sources = _bound("train.train.init_from", ())
  parsed = [pretrained.parse_source(s) for s in sources]
  assert [parts for _, parts in parsed] == [("encoder",), ("decoder",)], sources
  assert parsed[0][0] != parsed[1][0]


@pytest.mark.parametrize("pod", MM1_PODS)
def test_init_macros_are_set_from_the_command_line(pod):
  """--gin.INIT_ENCODER / INIT_DECODER, as tpu_scripts pass them to mm1-train and to the
  preflight (mm1-aot), pass the typo check (gin_cli.parse) and replace the defaults."""
  args, bindings = gin_cli.split_bindings(
      [f"--gin_file={pod}", "--gin.INIT_ENCODER='/data/clip:encoder'",
       "--gin.INIT_DECODER='/runs/llm/checkpoints:decoder'"])
  gin_cli.parse(argparse.Namespace(gin_file=[a.split("=", 1)[1] for a in args], gin_search_paths=[],
                                   module_import=[]), bindings)
  assert _bound("train.train.init_from", ()) == ["/data/clip:encoder", "/runs/llm/checkpoints:decoder"]
