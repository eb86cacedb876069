"""A task's own preprocessing (record transforms) runs on both loaders; a tf.data
preprocessor the grain loader cannot run stops it at start, naming it."""

import numpy as np
import pytest
import seqio
from test_formats import make_webdataset

from mm1_jax.data import build, loader, pipeline, sources, transforms
from mm1_jax.data.loader import Skipped
from tasks import shapes


@transforms.record_transform
def blue_boxes(record):
  return {**record, "caption": record["caption"].replace(b"red", b"blue")}


@transforms.record_transform
def even_only(record):
  return record if int(record["caption"].split()[-1]) % 2 == 0 else None


@transforms.record_transform
def fails_on_seven(record):
  if record["caption"].endswith(b" 7"):
    raise KeyError("seven")
  return record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("transforms")
  out = tmp / "corpus"
  build.build("webdataset", make_webdataset(tmp / "wds", 10), out, progress=False, num_shards=2)
  return out


def _register(corpus, prefix, chain):
  sources.register_corpus(prefix, corpus, image_size=32, output_features=shapes.OUTPUT_FEATURES,
                          kinds=("caption",), rates={"caption": 1.0}, transforms={"caption": chain})
  return pipeline.DataConfig(mixture_or_task_name=f"{prefix}_pretrain", batch_size=1, seq_len=64, max_images=1,
                             module_imports=(), shuffle=False)


def _texts(examples) -> list[str]:
  vocab = shapes.OUTPUT_FEATURES["text"].vocabulary
  image = vocab.encode("<image>")[0]
  return [vocab.decode([int(t) for t in ex["text"] if t != image]).strip() for ex in examples]


def _grain_epoch(cfg):
  """One pass over the records: (texts of the examples, skip reasons)."""
  mixed, _, _ = loader.mixed_examples(cfg, tokens_per_image=4, image_size=32, num_epochs=1)
  got = [mixed[i] for i in range(len(mixed))]
  return (_texts([ex for g in got if not isinstance(g, Skipped) for ex in g]),
          [g.reason for g in got if isinstance(g, Skipped)])


def _tfdata_epoch(cfg):
  task = seqio.get_mixture_or_task(cfg.mixture_or_task_name).tasks[0]
  ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, num_epochs=1, use_cached=False)
  return _texts(ds.as_numpy_iterator())


def test_record_transforms_rewrite_and_filter_on_both_loaders_alike(corpus):
  cfg = _register(corpus, "tfm", [blue_boxes, even_only])
  texts, skipped = _grain_epoch(cfg)
  # (The bundled vocabulary has no digits: the numbers decode as one unknown piece.)
  assert len(texts) == 5 and all(t.startswith("a blue box number") for t in texts), texts
  assert skipped == ["filtered_even_only"] * 5
  assert sorted(_tfdata_epoch(cfg)) == sorted(texts)
  # Without the transforms the same corpus feeds the red captions, all ten.
  plain, skipped = _grain_epoch(_register(corpus, "tfmplain", []))
  assert len(plain) == 10 and all(t.startswith("a red box number") for t in plain) and not skipped


def test_a_transform_that_raises_skips_the_record_and_counts_it(corpus, capsys):
  texts, skipped = _grain_epoch(_register(corpus, "tfmfail", [fails_on_seven]))
  assert len(texts) == 9
  assert skipped == ["transform_error_fails_on_seven"]
  assert "record transform fails_on_seven raised KeyError" in capsys.readouterr().err


def test_a_tf_data_preprocessor_stops_the_grain_loader_naming_it(corpus):
  @seqio.map_over_dataset
  def lowercase(ex):
    return ex

  _register(corpus, "tfmtf", [])
  task = seqio.get_mixture_or_task("tfmtf_caption")
  if "tfmtf_custom" in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove("tfmtf_custom")
  seqio.TaskRegistry.add("tfmtf_custom", source=task.source, output_features=task.output_features,
                         preprocessors=[sources.densify, lowercase, *task.preprocessors[1:]])
  cfg = pipeline.DataConfig(mixture_or_task_name="tfmtf_custom", batch_size=1, seq_len=64, max_images=1,
                            module_imports=())
  with pytest.raises(ValueError, match="preprocessor lowercase is a tf.data function.*loader='tfdata'"):
    loader.make_loader(cfg, tokens_per_image=4, image_size=32)
  with pytest.raises(TypeError, match="record_transform"):
    sources.preprocessors_for("caption", 32, shapes.OUTPUT_FEATURES, [lambda r: r])


def test_a_transform_must_keep_the_record_keys():
  dropped_key = transforms.record_transform(lambda r: {"caption": r["caption"]})
  with pytest.raises(ValueError, match="must keep the record's keys"):
    dropped_key.apply({"caption": b"x", "id": b"1", "image": b""})
  assert np.array_equal(blue_boxes.apply({"caption": b"red", "id": b"1"})["caption"], b"blue")


def test_the_registration_tutorial_runs_and_its_transform_shapes_the_batches(tmp_path, monkeypatch):
  """docs/data.md's my_mixtures.py, as written: its task drops every caption that names a
  triangle on the grain loader, and counts them."""
  import re
  import sys
  from pathlib import Path

  page = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
  section = page[page.index("## Registering a new mixture"):]
  code = re.search(r"```python\n(# my_mixtures.py\n.*?)```", section, re.S).group(1)
  (tmp_path / "my_mixtures.py").write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  for name in ("my_captions_without_triangles",):
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
  if "my_captions_and_text" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("my_captions_and_text")
  sys.modules.pop("my_mixtures", None)
  __import__("my_mixtures")
  cfg = pipeline.DataConfig(mixture_or_task_name="my_captions_and_text", batch_size=1, seq_len=64,
                            max_images=1, module_imports=())
  mixed, names, _ = loader.mixed_examples(cfg, tokens_per_image=4, image_size=32, num_epochs=1)
  got = [mixed[i] for i in range(200)]
  captions = [ex for g in got if not isinstance(g, Skipped) for ex in g
              if names[ex["task"]] == "my_captions_without_triangles"]
  filtered = [g for g in got if isinstance(g, Skipped) and g.reason == "filtered_no_triangles"]
  assert captions and filtered  # the bundled captions name triangles and other shapes
  assert not [t for t in _texts(captions) if "triangle" in t]
