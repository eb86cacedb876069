"""seqio tasks and the pre-training mixture over the bundled shapes-world corpus.

Pre-training (split "train"):
  mm1_shapes_caption      image-caption pairs          `<image>{caption}\\n`
  mm1_shapes_interleaved  documents of 2-3 images      text with `<image>` markers
  mm1_shapes_text         text-only documents
  mm1_shapes_pretrain     mixture, rates 45:45:10 (override in gin: `pipeline.DataConfig.mixture_rates`)

Supervised fine-tuning (split "train"):
  mm1_shapes_chat         LLaVA-style conversations about 1-2 images, loss on the answers only
  mm1_shapes_sft          mixture: chat 90, text 10

Few-shot evaluation (splits "support" for demonstrations, "test" for queries), raw
records for `mm1_jax.eval.fewshot`, benchmarks "shapes_caption" and "shapes_vqa":
  mm1_shapes_caption_eval   image, caption, references     CIDEr
  mm1_shapes_vqa_eval       image, question, answers,      VQA accuracy, also per answer type
                            answer_type (number, colour, shape)

High-resolution SFT test, on the detail corpus (`corpus.DetailSpec`: 128 px scenes whose
shapes are as large in pixels as the 64 px world's, so a 64 px downsizing halves them):
  mm1_shapes_detail_chat    conversations (split "train")
  mm1_shapes_detail_sft     mixture: detail chat 90, text 10
  mm1_shapes_vqa_detail_eval  as mm1_shapes_vqa_eval     benchmark "shapes_vqa_detail"

Text-only evaluation (no images), to judge what the text-only share of the mixture keeps:
  mm1_shapes_text_eval      text (split "test" only)       benchmark "shapes_text_ppl": held-out
                                                           documents, NLL per token and perplexity
  mm1_shapes_textqa_eval    question, answers,             benchmark "shapes_textqa": the text
                            answer_type (corners, group)   documents' facts, exact match per type
"""

from __future__ import annotations

from pathlib import Path

import seqio
import tensorflow as tf

from mm1_jax.data import corpus
from mm1_jax.data import preprocessors as prep
from mm1_jax.data import sources
from mm1_jax.data.tokenizer import DEFAULT_SPM_PATH
from mm1_jax.eval import metrics, readers

VOCABULARY = seqio.SentencePieceVocabulary(str(DEFAULT_SPM_PATH))
CORPUS_SPEC = corpus.CorpusSpec()
DETAIL_SPEC = corpus.DetailSpec()
OUTPUT_FEATURES = {
    "text": seqio.Feature(VOCABULARY, add_eos=True),
    prep.OUTPUT_IMAGE_KEY: seqio.ContinuousFeature(dtype=tf.uint8, rank=4, required=False),
    "weights": seqio.ContinuousFeature(dtype=tf.float32, rank=1, required=False),
}
PRETRAIN_RATES = {"mm1_shapes_interleaved": 45.0, "mm1_shapes_caption": 45.0, "mm1_shapes_text": 10.0}
SFT_RATES = {"mm1_shapes_chat": 90.0, "mm1_shapes_text": 10.0}
DETAIL_SFT_RATES = {"mm1_shapes_detail_chat": 90.0, "mm1_shapes_text": 10.0}


def _data_dir(spec) -> Path:
  return corpus.detail_data_dir() if isinstance(spec, corpus.DetailSpec) else corpus.default_data_dir()


class _EnsureCorpus:
  """Mixin: generate the corpus (`self.spec`'s) on first use, before any file is listed or read."""

  spec = CORPUS_SPEC

  def list_shards(self, split):
    corpus.ensure_corpus(spec=self.spec)
    return super().list_shards(split)

  def get_dataset(self, *args, **kwargs):
    corpus.ensure_corpus(spec=self.spec)
    return super().get_dataset(*args, **kwargs)


class GeneratedArrayRecordSource(_EnsureCorpus, sources.ArrayRecordExampleSource):
  """A training kind of a generated corpus (ArrayRecord, random access)."""

  def __init__(self, kind: str, spec=CORPUS_SPEC):
    self.spec = spec
    pattern = str(_data_dir(spec) / kind / "train-*.array_record")
    super().__init__({"train": pattern}, sources.FEATURES[kind], kind)


class GeneratedTFExampleSource(_EnsureCorpus, seqio.TFExampleDataSource):
  """An eval set of a generated corpus (TFRecord, read in order)."""

  def __init__(self, folder: str, splits: tuple[str, ...], features: dict, num_shards: int, spec=CORPUS_SPEC):
    self.spec = spec
    data_dir = _data_dir(spec)
    super().__init__(
        {s: str(data_dir / folder / f"{s}-*-of-{num_shards:05d}.tfrecord") for s in splits}, features)


def _str():
  return tf.io.FixedLenFeature([], tf.string)


def _str_list():
  return tf.io.VarLenFeature(tf.string)


def _register_all():
  for kind in sources.KINDS + sources.SFT_KINDS:
    seqio.TaskRegistry.add(
        f"mm1_shapes_{kind}", source=GeneratedArrayRecordSource(kind),
        preprocessors=sources.preprocessors_for(kind, CORPUS_SPEC.image_size, OUTPUT_FEATURES),
        output_features=OUTPUT_FEATURES)
  # The detail corpus's conversations: images decoded at the encoder's size as any others.
  seqio.TaskRegistry.add(
      "mm1_shapes_detail_chat", source=GeneratedArrayRecordSource("chat", DETAIL_SPEC),
      preprocessors=sources.preprocessors_for("chat", CORPUS_SPEC.image_size, OUTPUT_FEATURES),
      output_features=OUTPUT_FEATURES)
  seqio.MixtureRegistry.add("mm1_shapes_pretrain", list(PRETRAIN_RATES.items()))
  seqio.MixtureRegistry.add("mm1_shapes_sft", list(SFT_RATES.items()))
  seqio.MixtureRegistry.add("mm1_shapes_detail_sft", list(DETAIL_SFT_RATES.items()))

  vqa_features = {"id": _str(), "image": _str(), "question": _str(), "answers": _str_list(), "answer_type": _str()}
  eval_features = {
      "caption": ("caption_eval", {"id": _str(), "image": _str(), "caption": _str(),
                                   "references": _str_list()}, metrics.cider_metric, CORPUS_SPEC),
      "vqa": ("vqa_eval", vqa_features, metrics.vqa_metric, CORPUS_SPEC),
      "vqa_detail": ("vqa_eval", vqa_features, metrics.vqa_metric, DETAIL_SPEC),
  }
  for kind, (folder, features, metric_fn, spec) in eval_features.items():
    task = f"mm1_shapes_{kind}_eval"
    seqio.TaskRegistry.add(
        task,
        source=GeneratedTFExampleSource(folder, ("support", "test"), features, 1, spec),
        preprocessors=[sources.densify],
        output_features={},
        metric_fns=[metric_fn],
    )
  # Text only. The perplexity benchmark has no metric function: the evaluator scores it.
  seqio.TaskRegistry.add(
      "mm1_shapes_text_eval",
      source=GeneratedTFExampleSource("text_eval", ("test",), {"id": _str(), "text": _str()}, 1),
      preprocessors=[sources.densify],
      output_features={},
  )
  seqio.TaskRegistry.add(
      "mm1_shapes_textqa_eval",
      source=GeneratedTFExampleSource("textqa_eval", ("support", "test"), {
          "id": _str(), "question": _str(), "answers": _str_list(), "answer_type": _str()}, 1),
      preprocessors=[sources.densify],
      output_features={},
      metric_fns=[metrics.exact_match_metric],
  )


if "mm1_shapes_pretrain" not in seqio.MixtureRegistry.names():
  _register_all()
readers.register(readers.Benchmark("shapes_caption", "caption", "cider", "mm1_shapes_caption_eval"))
readers.register(readers.Benchmark("shapes_vqa", "vqa", "accuracy", "mm1_shapes_vqa_eval"))
readers.register(readers.Benchmark("shapes_vqa_detail", "vqa", "accuracy", "mm1_shapes_vqa_detail_eval"))
readers.register(readers.Benchmark("shapes_text_ppl", "perplexity", "perplexity", "mm1_shapes_text_eval"))
readers.register(readers.Benchmark("shapes_textqa", "text", "exact_match", "mm1_shapes_textqa_eval"))
