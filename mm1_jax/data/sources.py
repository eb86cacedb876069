"""Built corpora (`mm1-data build` output) as seqio tasks and mixtures.

A built corpus folder holds one TFDS dataset per kind, in ArrayRecord form
(`mm1_jax.data.tfds_layout`), plus the build reports:

  <dir>/mm1_caption/1.0.0/...       id, image (encoded bytes), caption
  <dir>/mm1_interleaved/1.0.0/...   id, images (list), text with <image> marks
  <dir>/mm1_text/1.0.0/...          id, text
  <dir>/mm1_chat/1.0.0/...          id, images (list), conversations (LLaVA JSON)
  <dir>/build.json                  counts: written, skipped by reason, per build

Each build is a TFDS split `<split>_<tag>` (<tag> names one source); a task reads every
tag of its split. Corpora built before this layout (`<dir>/<kind>/<split>-<tag>-*.array_record`)
keep loading (`corpus_source`); the records are the same tf.train.Examples in both.

ArrayRecord gives random access, so the source shards by record (any number of hosts,
each reading only its share) and shuffles globally: every epoch is a fresh permutation
of all records (seeded), not a window of a stream.

<dir> may be a bucket (gs://...; `mm1_jax.paths`): shards are listed through epath and
read by array_record, whose reader opens gs:// objects itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax import paths
from mm1_jax.data import preprocessors as prep
from mm1_jax.data import tfds_layout
from mm1_jax.data import vocabulary as vocabulary_lib
from mm1_jax.data.transforms import RecordTransform

KINDS = ("caption", "interleaved", "text")  # pre-training kinds
SFT_KINDS = ("chat",)  # instruction conversations (`mm1_jax.data.chat`)
FEATURES = {
    "caption": {"id": tf.io.FixedLenFeature([], tf.string), "image": tf.io.FixedLenFeature([], tf.string),
                "caption": tf.io.FixedLenFeature([], tf.string)},
    "interleaved": {"id": tf.io.FixedLenFeature([], tf.string), "images": tf.io.VarLenFeature(tf.string),
                    "text": tf.io.FixedLenFeature([], tf.string)},
    "text": {"id": tf.io.FixedLenFeature([], tf.string), "text": tf.io.FixedLenFeature([], tf.string)},
    "chat": {"id": tf.io.FixedLenFeature([], tf.string), "images": tf.io.VarLenFeature(tf.string),
             "conversations": tf.io.FixedLenFeature([], tf.string)},
}
TO_TEXT = {"caption": prep.caption_to_text, "interleaved": prep.interleaved_to_text, "text": prep.text_only}
MM1_RATES = {"interleaved": 45.0, "caption": 45.0, "text": 10.0}


class RandomAccessRecords:
  """tf.train.Examples in ArrayRecord shards, read by random access: what both corpus
  layouts share. A subclass lists the shards of a split and sets `_features` and `kind`."""

  _features: dict
  kind: str | None

  @property
  def features(self) -> dict:
    """The tf.train.Example features of a record (feature name -> tf.io spec)."""
    return dict(self._features)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def random_access(self, split: str):
    """The split's records by index, as serialised bytes (a grain / array_record random-access source)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415  (grain readers only)

    return ArrayRecordDataSource(list(self.list_shards(split)))

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached
    records = self.random_access(split)
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    mine = np.arange(len(records))[index::count]  # this host's records, whatever the shard count
    passes = [0]  # iterations of this dataset so far (seqio repeats by iterating it again)

    def generate():
      epochs = 0
      while num_epochs is None or epochs < num_epochs:
        # A new permutation per pass, seeded: the same seed gives the same sequence of passes.
        passes[0] += 1
        order = np.random.default_rng([seed or 0, passes[0]]).permutation(mine) if shuffle else mine
        for start in range(0, len(order), 256):
          yield from records.__getitems__([int(i) for i in order[start:start + 256]])
        epochs += 1

    ds = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec([], tf.string))
    features = self._features
    return ds.map(lambda r: tf.io.parse_single_example(r, features), num_parallel_calls=tf.data.AUTOTUNE)


class ArrayRecordExampleSource(RandomAccessRecords, seqio.DataSource):
  """Shards named by a glob pattern per split: the bundled corpus, eval sets, and
  corpora built before `mm1-data build` wrote TFDS datasets (`<dir>/<kind>/<split>-*.array_record`)."""

  def __init__(self, split_to_pattern: Mapping[str, str], features: Mapping[str, tf.io.FixedLenFeature],
               kind: str | None = None):
    """kind: "caption", "interleaved", "text" or "chat" for training sources (the grain
    loader needs it to turn records into examples); None for other records (eval sets)."""
    self._patterns = dict(split_to_pattern)
    self._features = dict(features)
    self.kind = kind
    super().__init__(splits=tuple(self._patterns))

  def list_shards(self, split: str) -> list[str]:
    folder, _, name = self._patterns[split].rpartition("/")
    files = sorted(str(f) for f in paths.path(folder).glob(name))
    if not files:
      raise FileNotFoundError(f"no ArrayRecord shards match {self._patterns[split]}; build the corpus "
                              "with `mm1-data build`")
    return files


class TfdsCorpusSource(RandomAccessRecords, seqio.TfdsDataSource):
  """One kind of a corpus `mm1-data build` wrote (`mm1_jax.data.tfds_layout`): a
  seqio.TfdsDataSource whose `split` reads every tag built into it (TFDS splits
  `<split>_<tag>`, resolved when first read). TFDS's own tf.data reader does not read
  ArrayRecord, so records come from its shards by random access, as the grain loader
  reads them."""

  def __init__(self, data_dir: str | os.PathLike, kind: str, split: str = "train"):
    self.data_dir, self.kind, self._split = str(paths.path(data_dir)), kind, split
    self._features = dict(FEATURES[kind])
    self._resolved = None
    super().__init__(tfds_name=f"{tfds_layout.dataset_name(kind)}:{tfds_layout.VERSION}",
                     tfds_data_dir=self.data_dir, splits={split: split}, read_only=True)

  @property
  def tfds_dataset(self):
    if self._resolved is None:  # the TFDS splits of this split's tags: read from the corpus on first use
      self._resolved = seqio.utils.LazyTfdsLoader(
          f"{tfds_layout.dataset_name(self.kind)}:{tfds_layout.VERSION}", data_dir=self.data_dir,
          split_map={self._split: tfds_layout.split_expression(self.data_dir, self.kind, self._split)},
          read_only=True)
    return self._resolved

  def list_shards(self, split: str) -> list[str]:
    return [str(f) for f in super().list_shards(split)]


@seqio.map_over_dataset
def densify(ex):
  """VarLen (sparse) features to dense tensors."""
  return {k: tf.sparse.to_dense(v) if isinstance(v, tf.sparse.SparseTensor) else v for k, v in ex.items()}


def preprocessors_for(kind: str, image_size: int, output_features: Mapping[str, seqio.Feature],
                      transforms: Sequence[RecordTransform] = ()) -> list:
  """The seqio preprocessors that turn a `kind` record into (text ids, images[, weights]),
  with the task's own record `transforms` (`mm1_jax.data.transforms`) first."""
  for t in transforms:
    if not isinstance(t, RecordTransform):
      raise TypeError(f"{t!r} is not a record transform: decorate it with "
                      "@mm1_jax.data.transforms.record_transform")
  if kind == "chat":
    return [densify, *transforms] + prep.chat_task_preprocessors(output_features["text"].vocabulary, image_size)
  return [densify, *transforms] + prep.task_preprocessors(TO_TEXT[kind], image_size)


def _own_step(p) -> bool:
  """Whether `p` is a step of the chain `preprocessors_for` builds (which the grain loader
  implements itself)."""
  if p in (densify, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos, prep.check_image_count):
    return True
  return isinstance(p, functools.partial) and p.func in (*TO_TEXT.values(), prep.chat_to_ids)


def grain_transforms(task: seqio.Task) -> list[RecordTransform]:
  """The record transforms among `task`'s preprocessors, in order, for the grain loader;
  a ValueError naming any other preprocessor (a tf.data function the grain loader cannot
  run) and the loader that can."""
  out = []
  for p in task.preprocessors:
    if isinstance(p, RecordTransform):
      out.append(p)
    elif not _own_step(p):
      name = getattr(p, "__name__", None) or getattr(getattr(p, "func", None), "__name__", None) or repr(p)
      raise ValueError(f"task {task.name!r}: preprocessor {name} is a tf.data function the grain loader "
                       "cannot run. Make it a record transform (@mm1_jax.data.transforms.record_transform: "
                       "docs/data.md), or read this task with DataConfig.loader='tfdata'.")
  return out


def corpus_source(directory: str | os.PathLike, kind: str, split: str = "train") -> seqio.DataSource:
  """The source of one kind of a built corpus: its TFDS dataset (`TfdsCorpusSource`), or
  the shards of a corpus built before the TFDS layout (`<dir>/<kind>/<split>-*.array_record`),
  which keep loading. Only looks for the old shards; reads nothing else."""
  legacy = f"{paths.path(directory)}/{kind}/{split}-*.array_record"  # a local folder or a bucket
  if any((paths.path(directory) / kind).glob(f"{split}-*.array_record")):
    if tfds_layout.exists(directory, kind):  # reading one layout would silently leave out the other
      raise ValueError(f"{directory} holds {kind} records in both layouts ({legacy} and "
                       f"{tfds_layout.dataset_dir(directory, kind)}): rebuild the older sources with "
                       "`mm1-data build` into the TFDS layout, or move them to a corpus folder of their own")
    return ArrayRecordExampleSource({split: legacy}, FEATURES[kind], kind)
  return TfdsCorpusSource(directory, kind, split)


def register_corpus(prefix: str, directory: str | os.PathLike, *, image_size: int,
                    output_features: Mapping[str, seqio.Feature], split: str = "train",
                    rates: Mapping[str, float] = MM1_RATES, kinds: tuple[str, ...] = KINDS,
                    mixture: str | None = None,
                    transforms: Mapping[str, Sequence[RecordTransform]] | None = None) -> list[str]:
  """Registers `<prefix>_<kind>` tasks for a built corpus and a mixture of them by `rates`
  (named `mixture`, default `<prefix>_pretrain`).

  Only the layout is looked up here (`corpus_source`): a missing folder fails when the
  task is first read, with a message that says how to build it. Returns the task names. An SFT corpus (`mm1-data
  build --format=llava`) is registered with kinds=("chat",) and rates naming it.
  transforms: per kind, record transforms the kind's task runs first
  (`mm1_jax.data.transforms`).
  """
  names = []
  for kind in kinds:
    name = f"{prefix}_{kind}"
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=corpus_source(directory, kind, split),
        preprocessors=preprocessors_for(kind, image_size, output_features, (transforms or {}).get(kind, ())),
        output_features=output_features)
    names.append(name)
  mixture = mixture or f"{prefix}_pretrain"
  if mixture in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [(f"{prefix}_{k}", rates[k]) for k in kinds])
  return names


_REGISTERED: dict[str, "Corpus"] = {}  # mixture name -> the corpus registered under it


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A built corpus as seqio tasks, registered where a run needs them (see `register`).

  Attributes:
    data_dir: the folder `mm1-data build` wrote (`~` expanded).
    vocabulary: the seqio Vocabulary of its text (the run's VOCABULARY), or what
      `mm1_jax.data.vocabulary.load` takes: a bundled model's name, a SentencePiece
      model, a Hugging Face tokenizer.json or a folder holding one. `<image>` must be
      one piece (`mm1-convert import` adds it to an LLM's tokenizer).
    prefix: tasks are named `<prefix>_<kind>`.
    image_size: resolution images are decoded at (the pipeline resizes them to the
      model's if it differs); MM1's is 378.
    kinds: which kinds of the folder become tasks.
    rates: mixture rates per kind (default `MM1_RATES`, 45:45:10).
    mixture: the mixture's name (default `<prefix>_pretrain`).
  """

  data_dir: str
  vocabulary: Any
  prefix: str = "mm1"
  image_size: int = 378
  kinds: tuple[str, ...] = KINDS
  rates: Mapping[str, float] | None = None
  mixture: str | None = None

  @property
  def mixture_name(self) -> str:
    return self.mixture or f"{self.prefix}_pretrain"

  def output_features(self) -> dict[str, seqio.Feature]:
    vocabulary = vocabulary_lib.load(self.vocabulary)
    features = {"text": seqio.Feature(vocabulary, add_eos=True),
                prep.OUTPUT_IMAGE_KEY: seqio.ContinuousFeature(dtype=tf.uint8, rank=4, required=False)}
    if "chat" in self.kinds:
      features["weights"] = seqio.ContinuousFeature(dtype=tf.float32, rank=1, required=False)
    return features

  def register(self) -> list[str]:
    """Registers the tasks and the mixture (again only if another corpus took the name).
    Reads nothing but the tokenizer: a missing folder fails when a task is first read."""
    names = [f"{self.prefix}_{k}" for k in self.kinds]
    registered = set(seqio.TaskRegistry.names())
    if (_REGISTERED.get(self.mixture_name) == self and set(names) <= registered
        and self.mixture_name in seqio.MixtureRegistry.names()):
      return names
    names = register_corpus(self.prefix, self.data_dir, image_size=self.image_size,
                            output_features=self.output_features(), rates=self.rates or MM1_RATES,
                            kinds=self.kinds, mixture=self.mixture_name)
    _REGISTERED[self.mixture_name] = self
    return names


def register_all(corpora) -> None:
  """Registers each `Corpus` of a config's `corpora` field."""
  for corpus in corpora or ():
    corpus.register()
