"""A built corpus's folder and vocabulary come from gin (DATA_DIR, TOKENIZER -> VOCABULARY), not from code."""

from pathlib import Path

import gin
import pytest
import seqio

from mm1_jax.data import pipeline, sources, tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_tokenizer_resolves_a_bundled_name_or_a_path(tmp_path):
  assert tokenizer.resolve("shapes_sp") == tokenizer.DEFAULT_SPM_PATH
  assert tokenizer.resolve(str(tokenizer.DEFAULT_SPM_PATH)) == tokenizer.DEFAULT_SPM_PATH
  with pytest.raises(FileNotFoundError, match="shapes_sp"):
    tokenizer.resolve(str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    tokenizer.resolve("not_bundled")


def test_corpus_registers_its_folder_and_tokenizer(tmp_path):
  corpus = sources.Corpus(data_dir=str(tmp_path / "c"), vocabulary="shapes_sp", prefix="cfgtest", image_size=64)
  names = corpus.register()
  assert names == ["cfgtest_caption", "cfgtest_interleaved", "cfgtest_text"]
  task = seqio.get_mixture_or_task("cfgtest_caption")
  # Not built yet: the TFDS dataset `mm1-data build` will write there, looked up when first read.
  assert isinstance(task.source, sources.TfdsCorpusSource)
  assert (task.source.data_dir, task.source.kind) == (str(tmp_path / "c"), "caption")
  assert task.output_features["text"].vocabulary.sentencepiece_model_file == str(tokenizer.DEFAULT_SPM_PATH)
  mixture = seqio.get_mixture_or_task("cfgtest_pretrain")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "cfgtest_caption": 45.0, "cfgtest_interleaved": 45.0, "cfgtest_text": 10.0}
  corpus.register()  # the same corpus again: left as registered
  assert seqio.get_mixture_or_task("cfgtest_caption") is task
  moved = sources.Corpus(data_dir=str(tmp_path / "d"), vocabulary="shapes_sp", prefix="cfgtest", image_size=64)
  config = pipeline.DataConfig(mixture_or_task_name="cfgtest_pretrain", module_imports=(), corpora=(moved,))
  assert pipeline.get_mixture_or_task(config).name == "cfgtest_pretrain"
  assert seqio.get_mixture_or_task("cfgtest_caption").source.data_dir == str(tmp_path / "d")


def test_run_files_set_data_dir_and_one_vocabulary(tmp_path):
  model_file = tmp_path / "sp.model"
  model_file.write_bytes(tokenizer.DEFAULT_SPM_PATH.read_bytes())
  gin.clear_config(clear_constants=True)
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_files_and_bindings(["gin/pods/mm1_3b_v5p-128.gin"],
                                        ["DATA_DIR = '/mnt/corpus'", f"TOKENIZER = '{model_file}'"])
    data = gin.query_parameter("train.train.data").scoped_configurable_fn()
    vocabulary_ref = gin.query_parameter("fewshot.FewShotConfig.vocabulary")  # %VOCABULARY
    evaluation_vocabulary = vocabulary_ref.scoped_configurable_fn()
    operative = gin.config_str()
  finally:
    gin.clear_config(clear_constants=True)
  (corpus,) = data.corpora
  assert corpus.data_dir == "/mnt/corpus"
  assert corpus.vocabulary.sentencepiece_model_file == str(model_file)
  assert data.mixture_or_task_name == "mm1_pretrain" == corpus.mixture_name
  assert evaluation_vocabulary == corpus.vocabulary  # prompts are encoded with the same one
  assert str(model_file) in operative  # the config a run writes names it
