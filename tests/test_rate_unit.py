"""Mixture rates in tokens: DataConfig.rate_unit = "tokens" makes each task's share of the
tokens fed to the model follow its rate, where "records" makes its share of records do."""

import numpy as np
import pytest
import seqio

import tasks
from mm1_jax.data import corpus, inspect_data, loader, pipeline, sources, tokenizer

SEQ_LEN = 512
VOCAB = seqio.SentencePieceVocabulary(str(tokenizer.DEFAULT_SPM_PATH))


def _texts(word: str, low: int, high: int, n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join([word] * int(rng.integers(low, high + 1))) for _ in range(n)]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
  """Two text tasks at rates 50:50 whose records differ 10x in length: "red ..." of 15-25
  words and "blue ..." of 150-250."""
  root = tmp_path_factory.mktemp("rates")
  docs = {"rshort": _texts("red", 15, 25, 150, 0), "rlong": _texts("blue", 150, 250, 150, 1)}
  for name, texts in docs.items():
    shards = corpus.ShardWriter(root / name / "text", "train-raw", 2)
    for i, t in enumerate(texts):
      shards.write(corpus.tf_example({"id": f"{name}{i}", "text": t}))
    shards.close()
    sources.register_corpus(name, root / name, image_size=64, output_features=tasks.shapes.OUTPUT_FEATURES,
                            kinds=("text",), rates={"text": 1.0})
  if "ratetest" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("ratetest")
  seqio.MixtureRegistry.add("ratetest", [("rshort_text", 50.0), ("rlong_text", 50.0)])
  short, long = ({i for t in docs[name] for i in VOCAB.encode(t)} for name in ("rshort", "rlong"))
  assert not short & long  # every token but EOS tells its task
  return short, long


def _short_token_share(cfg, kind: str, short: set, long: set, batches: int) -> float:
  if kind == "grain":
    it = loader.make_loader(cfg, tokens_per_image=4, image_size=64)
  else:
    it = pipeline.iterate(pipeline.make_dataset(cfg, tokens_per_image=4, image_size=64))
  tokens = np.concatenate([next(it)["tokens"].ravel() for _ in range(batches)])
  n_short, n_long = np.isin(tokens, list(short)).sum(), np.isin(tokens, list(long)).sum()
  assert n_short + n_long > 0.9 * (tokens > 1).sum()  # every token but EOS and padding is counted
  return n_short / (n_short + n_long)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grain", "tfdata"])
def test_token_rates_give_token_shares(mixture, kind):
  """50:50 in tokens: the short task's share of tokens is 0.5 within 0.06 (grain mixes
  deterministically; the tf.data mixture samples, hence the margin). 50:50 in records: the
  short task gives about 20 / (20 + 200) of the tokens."""
  cfg = pipeline.DataConfig(mixture_or_task_name="ratetest", batch_size=4, seq_len=SEQ_LEN, max_images=1,
                            seed=0, module_imports=(), loader=kind, rate_sample=64)
  by_tokens = _short_token_share(pipeline.DataConfig(**{**cfg.__dict__, "rate_unit": "tokens"}), kind,
                                 *mixture, batches=25)
  by_records = _short_token_share(cfg, kind, *mixture, batches=25)
  assert abs(by_tokens - 0.5) < 0.06, by_tokens
  assert 0.05 < by_records < 0.14, by_records


def test_token_estimate_is_reported_and_seeded(mixture, capsys):
  cfg = pipeline.DataConfig(mixture_or_task_name="ratetest", batch_size=4, seq_len=SEQ_LEN, max_images=1,
                            seed=0, module_imports=(), rate_unit="tokens", rate_sample=32)
  it = loader.make_loader(cfg, tokens_per_image=4, image_size=64)
  mixing = it.mixing()
  assert "rshort_text" in capsys.readouterr().out  # printed at start
  short, long = mixing["rshort_text"], mixing["rlong_text"]
  assert short["records_sampled"] == long["records_sampled"] == 32
  assert 5 < long["mean_tokens_per_record"] / short["mean_tokens_per_record"] < 20
  assert short["rate"] == pytest.approx(0.5) and short["weight"] > 0.8  # ~10 short records per long one
  again = loader.make_loader(cfg, tokens_per_image=4, image_size=64).mixing()
  assert again == mixing  # same seed, same estimate


def test_inspect_reports_token_shares(mixture, tmp_path):
  """`mm1-data inspect`'s token shares are those of what it packed: ~0.5 with token rates,
  ~0.1 with record rates, for the short task."""
  shares = {}
  for unit in ("tokens", "records"):
    cfg = pipeline.DataConfig(mixture_or_task_name="ratetest", seq_len=SEQ_LEN, max_images=1, seed=0,
                              module_imports=(), rate_unit=unit, rate_sample=64)
    report = inspect_data.inspect(cfg, n=400, out=tmp_path / unit, tokens_per_image=4, image_size=64,
                                  progress=False)
    assert report["rate_unit"] == unit
    assert sum(r["realised"] for r in report["token_shares"].values()) == pytest.approx(1.0)
    assert report["token_shares_by_kind"] == {"text": pytest.approx(1.0)}
    shares[unit] = report["token_shares"]["rshort_text"]["realised"]
  assert abs(shares["tokens"] - 0.5) < 0.06 and 0.05 < shares["records"] < 0.14, shares


def test_rate_unit_is_checked():
  with pytest.raises(ValueError, match="rate_unit"):
    pipeline.DataConfig(rate_unit="bytes")
