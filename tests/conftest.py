"""Test setup: 8 simulated CPU devices and a shared generated corpus.

All must be set before jax / the task registry are imported.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MM1_DATA_DIR", os.path.join(tempfile.gettempdir(), "mm1_jax_test_corpus"))
# Many tests start `mm1-train` processes on the same small configs: jax's persistent
# compilation cache lets every process after the first skip compiling the same programs
# (about 12 s of a 28 s run). Keyed by the program, flags and devices, so it cannot
# change a result.
# etils.epath decides once per process whether gs:// goes through TensorFlow's gfile (which
# cannot reach the Cloud Storage emulator of tests/test_buckets.py) or fsspec/gcsfs (which
# can): the whole test process takes fsspec. Local paths are unaffected.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mm1_jax_test_jax_cache"))

import pytest  # noqa: E402

from mm1_jax import connector, decoder, model, vit  # noqa: E402


def tiny_model_config() -> model.MM1Config:
  """Smaller than gin/models/mm1_tiny.gin so that tests compile and run fast."""
  return model.MM1Config(
      encoder=vit.ViTConfig(image_size=64, patch_size=16, width=64, depth=2, num_heads=2, mlp_dim=128),
      connector=connector.CAbstractorConfig(num_tokens=4, hidden=32, depth=1),
      decoder=decoder.DecoderConfig(vocab_size=256, width=64, depth=2, num_heads=4, num_kv_heads=2,
                                    head_dim=16, mlp_dim=128),
      image_token_id=3,
  )


@pytest.fixture
def tiny_config() -> model.MM1Config:
  return tiny_model_config()


def init_apply(module, *args, **kwargs):
  """(unboxed variables, output): `module` initialised from PRNGKey(0) and applied to `args`,
  each as one compiled program. Run op by op, an init compiles every primitive it meets on
  its own, which on CPU takes many times longer than compiling the whole function once."""
  import functools

  import flax.linen as nn
  import jax

  variables = nn.meta.unbox(jax.jit(functools.partial(module.init, **kwargs))(jax.random.PRNGKey(0), *args))
  return variables, jitted(module, **kwargs)(variables, *args)


def jitted(module, **kwargs):
  """`module.apply(variables, *args, **kwargs)` (method=, mutable=, ...) as one compiled program."""
  import functools

  import jax

  return jax.jit(functools.partial(module.apply, **kwargs))


@pytest.fixture
def clean_gin():
  """gin's global configuration empty before and after the test, with the checkout's gin
  files findable as gin/..."""
  import gin

  from mm1_jax import gin_files

  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(gin_files.root()))
  yield
  gin.clear_config(clear_constants=True)


def pytest_configure(config):
  """Generates the shared corpus once, before any xdist worker starts, so that workers
  never race to write it."""
  if hasattr(config, "workerinput"):
    return
  from pathlib import Path

  from mm1_jax.data import corpus
  corpus.ensure_corpus(Path(os.environ["MM1_DATA_DIR"]), progress=False)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
  # libtpu serves one process at a time: every test marked `libtpu` (it compiles for a TPU
  # topology, in this process or through mm1-aot) runs on the same xdist worker
  # (--dist loadgroup), one after another.
  for item in items:
    if item.get_closest_marker("libtpu"):
      item.add_marker(pytest.mark.xdist_group("libtpu"))
  # Modules with the most slow tests first, each module's tests together and in order (so a
  # module-scoped fixture is set up once): xdist hands out tests in this order, so the many
  # short tests fill the end and no worker idles while the other finishes a long one that
  # happened to be collected last.
  slow: dict[str, int] = {}
  for item in items:
    slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow[item.module.__name__])
