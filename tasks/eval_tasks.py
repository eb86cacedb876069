"""seqio tasks for the few-shot benchmarks, read from their official annotation files.

  mm1_eval_coco      COCO Captions, Karpathy split         CIDEr
  mm1_eval_nocaps    NoCaps val (demonstrations: COCO)      CIDEr
  mm1_eval_textcaps  TextCaps val                           CIDEr
  mm1_eval_vqav2     VQAv2 val                              VQA accuracy
  mm1_eval_textvqa   TextVQA val                            VQA accuracy
  mm1_eval_vizwiz    VizWiz-VQA val                         VQA accuracy
  mm1_eval_okvqa     OK-VQA val                             VQA accuracy
  mm1_eval_gqa       GQA test-dev balanced                  exact match

Splits "support" (demonstrations, from the train split) and "test". Where the files
are: `mm1_jax.eval.readers` (data root, per-file overrides). Each task's metric
function takes the targets (references or answers) and the decoded predictions.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from mm1_jax.eval import metrics, readers

METRIC_FNS = {"cider": metrics.cider_metric, "accuracy": metrics.vqa_metric,
              "exact_match": metrics.exact_match_metric}
_TEXT = ("id", "image_id", "image_path", "question", "caption", "answer_type")
_LISTS = ("references", "answers")


class BenchmarkSource(seqio.DataSource):
  """A benchmark's records, read from its annotation files when the dataset is made."""

  def __init__(self, name: str):
    self._name = name
    super().__init__(splits=tuple(readers.LAYOUTS[name]))

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> list[str]:
    return [f"{self._name}:{split}"]

  def get_dataset(self, split: str = "test", shuffle: bool = False, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # read in file order, once
    records, skipped = readers.read(self._name, split)
    if skipped:
      print(f"{self._name} {split}: skipped {skipped} malformed entries")
    if shard_info:
      records = records[shard_info.index::shard_info.num_shards]

    def generate():
      for r in records:
        yield {**{k: r.get(k, "") for k in _TEXT}, **{k: r.get(k, []) for k in _LISTS}}

    signature = {**{k: tf.TensorSpec([], tf.string) for k in _TEXT},
                 **{k: tf.TensorSpec([None], tf.string) for k in _LISTS}}
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def _register_all():
  for name in readers.LAYOUTS:
    b = readers.get(name)
    seqio.TaskRegistry.add(b.task, source=BenchmarkSource(name), output_features={},
                           metric_fns=[METRIC_FNS[b.metric]])


if "mm1_eval_coco" not in seqio.TaskRegistry.names():
  _register_all()
