"""Built corpora as TensorFlow Datasets in ArrayRecord form.

`mm1-data build` writes one TFDS dataset per kind of record under the corpus folder:

  <dir>/mm1_caption/1.0.0/dataset_info.json, features.json, metadata.json
  <dir>/mm1_caption/1.0.0/mm1_caption-train_cc3m.array_record-00000-of-00008
  <dir>/mm1_interleaved/1.0.0/...   <dir>/mm1_text/1.0.0/...   <dir>/mm1_chat/1.0.0/...

Each build of one source is a TFDS split named `<split>_<tag>` (`train_cc3m`,
`train_coyo`); metadata.json maps it back to its split and tag and keeps the build's
report (counts written, skipped by reason). A seqio task reads every tag of a split at
once: the TFDS split expression `train_cc3m+train_coyo` (`split_expression`).

So the folder loads with TFDS's own readers, with no builder class to import:

  tfds.data_source("mm1_caption", data_dir=DIR, split="train_cc3m")   # random access (grain)

and `mm1_jax.data.sources.TfdsCorpusSource` registers it as a seqio task: a
seqio.TfdsDataSource (splits, example counts and shard files from the TFDS metadata)
whose records are read from the ArrayRecord shards by index, since TFDS's tf.data
reader (`as_dataset`, what a plain seqio.TfdsDataSource calls) does not read ArrayRecord.

Records are tf.train.Examples whose bytes equal those of the features below serialised
by TFDS (id and text as Text, encoded images as scalar string Tensors, kept as the
build wrote them: this package decodes images itself, `mm1_jax.data.images`), so the
grain loader reads the shards as raw records and `tfds.data_source` decodes the same
bytes into dicts. VERSION changes when the features do.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from mm1_jax import paths

VERSION = "1.0.0"
_NAME = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")


def dataset_name(kind: str) -> str:
  return f"mm1_{kind}"


def dataset_dir(root: paths.PathLike, kind: str):
  """The TFDS dataset folder of one kind (an epath.Path: local or a bucket)."""
  return paths.path(root) / dataset_name(kind) / VERSION


def split_name(split: str, tag: str) -> str:
  """The TFDS split of one build: `<split>_<tag>`."""
  for what, value in (("split", split), ("tag", tag)):
    if not _NAME.match(value):
      raise ValueError(f"--{what}={value!r}: use letters, digits and single underscores (it names a TFDS split)")
  return f"{split}_{tag}"


def shard_name(kind: str, tfds_split: str, index: int, count: int) -> str:
  """TFDS's default file name for shard `index` of `count` of one split."""
  return f"{dataset_name(kind)}-{tfds_split}.array_record-{index:05d}-of-{count:05d}"


def features(kind: str):
  """The TFDS features of a kind's records (see the module doc)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (TFDS: only when writing or reading metadata)

  f = tfds.features
  encoded = f.Tensor(shape=(), dtype=np.object_, doc="encoded JPEG or PNG bytes")
  fields = {
      "caption": {"image": encoded, "caption": f.Text()},
      "interleaved": {"images": f.Sequence(encoded), "text": f.Text(doc="one <image> marker per image, in order")},
      "text": {"text": f.Text()},
      "chat": {"images": f.Sequence(encoded), "conversations": f.Text(doc="LLaVA turns as JSON")},
  }[kind]
  return f.FeaturesDict({"id": f.Text(), **fields})


def read_metadata(root: paths.PathLike, kind: str) -> dict[str, Any]:
  """metadata.json of a kind's dataset ({} if there is none): {"splits": {tfds_split:
  {"split", "tag", "build"}}}."""
  path = dataset_dir(root, kind) / "metadata.json"
  return json.loads(path.read_text()) if path.exists() else {}


def exists(root: paths.PathLike, kind: str) -> bool:
  return (dataset_dir(root, kind) / "dataset_info.json").exists()


def tfds_splits(root: paths.PathLike, kind: str, split: str) -> list[str]:
  """The TFDS splits (one per tag) that make up `split` of a kind's dataset, in name order."""
  found = read_metadata(root, kind).get("splits", {})
  return sorted(name for name, info in found.items() if info.get("split") == split)


def split_expression(root: paths.PathLike, kind: str, split: str) -> str:
  """`split` as a TFDS split expression over its tags (`train_cc3m+train_coyo`); a
  FileNotFoundError saying how to build it if there is none."""
  names = tfds_splits(root, kind, split)
  if not names:
    raise FileNotFoundError(f"{dataset_dir(root, kind)} has no {split!r} split; build it with "
                            f"`mm1-data build --split={split} --out={root} ...`")
  return "+".join(names)


def write_metadata(root: paths.PathLike, kind: str, shard_lengths: dict[str, list[int]],
                   splits: dict[str, dict[str, Any]]) -> None:
  """Writes dataset_info.json, features.json and metadata.json for the shards now in a
  kind's folder. shard_lengths: TFDS split -> records per shard, for every split the
  dataset keeps; splits: TFDS split -> {"split", "tag", "build": report}."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  folder = dataset_dir(root, kind)
  infos = []
  for name, lengths in sorted(shard_lengths.items()):
    size = sum((folder / shard_name(kind, name, i, len(lengths))).stat().length for i in range(len(lengths)))
    infos.append(tfds.core.SplitInfo(name=name, shard_lengths=list(lengths), num_bytes=size))
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=features(kind), split_infos=infos, check_data=False,
      description=f"{kind} records built by `mm1-data build` (mm1_jax.data.tfds_layout)",
      metadata=tfds.core.MetadataDict(splits=splits))
