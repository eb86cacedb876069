"""Text-only evaluation: held-out perplexity (shapes_text_ppl) and questions on the text
documents' facts (shapes_textqa), beside the image benchmarks in one evaluator."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mm1_jax import sharding
from mm1_jax.data import corpus, vocabulary
from mm1_jax.data import shapes_world as sw
from mm1_jax.eval import fewshot, report
from mm1_jax.model import MM1

SPEC = corpus.CorpusSpec()


def _training_texts() -> set[str]:
  return {sw.text_example(SPEC.seed, i)["text"] for i in range(SPEC.num_text)}


def _evaluator(config, benchmarks, **kw):
  mesh_cfg = sharding.MeshConfig()
  cfg = fewshot.FewShotConfig(benchmarks=benchmarks, batch_size=8, **kw)
  return fewshot.Evaluator(cfg, MM1(config), sharding.make_mesh(mesh_cfg), mesh_cfg.rules)


def _params(config, seed=0):
  m = MM1(config)
  dummy = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(seed), dummy, jnp.zeros((1, 1, 64, 64, 3), jnp.uint8),
                              jnp.ones_like(dummy), dummy))["params"]


def test_textqa_records_state_the_worlds_facts():
  lines = {line for t in _training_texts() for line in t.splitlines()}
  for split, n in (("support", SPEC.num_textqa_support), ("test", SPEC.num_textqa_test)):
    records = fewshot.load_split("mm1_shapes_textqa_eval", split)
    assert len(records) == n and len({r["id"] for r in records}) == n
    assert {r["answer_type"] for r in records[:2]} == {"corners", "group"}  # any prefix holds both
    for r in records:
      assert "image" not in r and "image_path" not in r and len(r["answers"]) == 1
      q, a = r["question"], r["answers"][0]
      if r["answer_type"] == "corners":
        kind = re.fullmatch(r"Question: how many corners does a (\w+) have\? Answer:", q).group(1)
        assert a == {"circle": "0", "square": "4", "triangle": "3"}[kind]
        line = f"{q} {a}"
      else:
        word, colour, kind = re.fullmatch(r"(\w+) (\w+) (\w+?)s? make a group of", q).groups()
        assert a == str(sw.NUMBER_WORDS.index(word)) and colour in sw.COLOURS and kind in sw.SHAPES
        assert q.split()[2] == (kind if a == "1" else kind + "s")
        line = f"{q} {a}."
      assert line in lines, f"no training document states {line!r}"  # the documents teach it


def test_held_out_documents_are_not_training_documents():
  docs = fewshot.load_split("mm1_shapes_text_eval", "test")
  assert len(docs) == SPEC.num_text_eval
  assert all(d["id"].startswith("text_eval-") and d["text"].endswith("\n") for d in docs)
  assert not {d["text"] for d in docs} & _training_texts()
  manifest = json.loads((corpus.default_data_dir() / "manifest.json").read_text())
  assert manifest["counts"]["text_eval/test"] == SPEC.num_text_eval
  assert manifest["counts"]["textqa_eval/test"] == SPEC.num_textqa_test


def test_corpus_writer_drops_held_out_documents_seen_in_training(tmp_path, monkeypatch):
  """Every other held-out document made a copy of a training one: those are dropped and
  counted, and the split is still filled."""
  text_example = sw.text_example

  def leaky(seed, index, stream="text"):
    if stream == "text_eval" and index % 2 == 0:
      return text_example(seed, index % 6)  # a training document
    return text_example(seed, index, stream)

  monkeypatch.setattr(corpus.sw, "text_example", leaky)
  spec = corpus.CorpusSpec(num_caption=2, num_interleaved=2, num_text=6, num_chat=2, num_eval_support=1,
                           num_eval_test=1, num_text_eval=5, num_textqa_support=2, num_textqa_test=2,
                           num_shards=1)
  manifest = corpus.write_corpus(tmp_path, spec, progress=False)
  assert manifest["counts"]["text_eval/test"] == 5
  assert manifest["eval_texts_dropped_as_seen_in_training"] == 5  # indices 0, 2, 4, 6, 8
  texts = [tf.train.Example.FromString(r.numpy()).features.feature["text"].bytes_list.value[0].decode()
           for r in tf.data.TFRecordDataset(str(tmp_path / "text_eval" / "test-00000-of-00001.tfrecord"))]
  assert len(texts) == 5 and not set(texts) & {text_example(0, i)["text"] for i in range(6)}


def test_token_nll_normalises_over_the_vocabulary_only():
  logits = jnp.zeros((1, 3, 300)).at[0, 1, 280].set(50.0)  # rows past the vocabulary are ignored
  nll = fewshot.token_nll(logits, jnp.asarray([[5, 6, 7]]), vocab_size=256)
  np.testing.assert_allclose(np.asarray(nll), np.log(256.0), rtol=1e-6)


def test_perplexity_is_the_models_own_nll_per_token(tiny_config):
  evaluator = _evaluator(tiny_config, ("shapes_text_ppl",), shots=(0, 2), num_queries=2)
  bench = evaluator.benchmarks["shapes_text_ppl"]
  assert len(bench.test) == SPEC.num_text_eval and not bench.support
  # Two documents of different lengths, alternating: rows of one batch are padded to the
  # longer, and the second batch (one document) is mostly padding rows.
  docs = sorted(bench.test[:2], key=lambda d: len(d["text"]))
  assert len(docs[0]["text"]) < len(docs[1]["text"])
  bench.test = [docs[i % 2] for i in range(9)]  # num_queries does not cut it
  params = _params(tiny_config)
  results, samples = evaluator.evaluate(params, progress=False)
  # Computed once, as 0-shot, whatever the shots.
  assert set(results) == {"shapes_text_ppl/0shot/nll", "shapes_text_ppl/0shot/perplexity",
                          "shapes_text_ppl/0shot/score_tokens_per_s"}

  # By hand, each document alone: the full forward pass, no padding, no image token.
  m, ids = MM1(tiny_config), vocabulary.special_ids(vocabulary.load("shapes_sp"))
  hand = []
  for doc in docs:
    seq = np.asarray(evaluator.vocab.encode(doc["text"]) + [ids.eos], np.int32)
    assert ids.image not in seq
    t = len(seq) - 1
    logits = jax.jit(m.apply)({"params": params}, jnp.asarray(seq[None, :-1]),
                              jnp.zeros((1, 1, 64, 64, 3), jnp.uint8), jnp.ones((1, t), jnp.int32),
                              jnp.arange(t)[None])
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64)[:, :ids.size], axis=-1)
    hand.append((-sum(logp[i, seq[i + 1]] for i in range(t)), t))  # position i predicts token i + 1
  total = 5 * hand[0][0] + 4 * hand[1][0]
  count = 5 * hand[0][1] + 4 * hand[1][1]
  np.testing.assert_allclose(results["shapes_text_ppl/0shot/nll"], total / count, rtol=2e-5)
  np.testing.assert_allclose(results["shapes_text_ppl/0shot/perplexity"], np.exp(total / count), rtol=2e-5)
  np.testing.assert_allclose([s["nll"] for s in samples["shapes_text_ppl/0shot"]],
                             [hand[i % 2][0] / hand[i % 2][1] for i in range(8)], rtol=2e-5)
  assert evaluator.info()["shapes_text_ppl"] == {"test_examples": 9, "scored_tokens": count}

  # Uniform logits (every parameter zero): perplexity is the vocabulary's size.
  zeros = jax.tree.map(jnp.zeros_like, params)
  results, _ = evaluator.evaluate(zeros, progress=False)
  np.testing.assert_allclose(results["shapes_text_ppl/0shot/perplexity"], ids.size, rtol=1e-5)


def test_text_prompts_have_no_image_and_never_show_the_query():
  support = [{"id": "a", "question": "Question: how many corners does a square have? Answer:", "answers": ["4"]},
             {"id": "b", "question": "two red circles make a group of", "answers": ["2"]},
             {"id": "c", "question": "one blue square make a group of", "answers": ["1"]}]
  query = {"id": "q", "question": support[0]["question"], "answers": ["4"]}
  for index in range(10):
    demos = fewshot.choose_demos(support, query, 2, seed=0, index=index)
    assert {d["id"] for d in demos} == {"b", "c"}  # never the query's own question
  text = fewshot.build_prompt(fewshot.TEMPLATES["text"], support[1:], query)
  assert text == ("two red circles make a group of 2\none blue square make a group of 1\n"
                  "Question: how many corners does a square have? Answer:")


@pytest.mark.slow
def test_text_benchmarks_run_beside_vqa_without_changing_it(tiny_config, tmp_path):
  kw = {"shots": (0, 2), "num_queries": 8, "max_new_tokens": 4}
  params = _params(tiny_config)
  alone, _ = _evaluator(tiny_config, ("shapes_vqa",), **kw).evaluate(params, progress=False)
  evaluator = _evaluator(tiny_config, ("shapes_vqa", "shapes_textqa", "shapes_text_ppl"), **kw,
                         train_mixture="mm1_shapes_pretrain")
  evaluator.benchmarks["shapes_text_ppl"].test = evaluator.benchmarks["shapes_text_ppl"].test[:8]
  results = evaluator.evaluate_and_write(params, 3, tmp_path)
  scores = lambda r: {k: v for k, v in r.items() if k.startswith("shapes_vqa/") and "tokens_per_s" not in k}  # noqa: E731
  assert scores(results) == scores(alone) and scores(alone)
  for k in (0, 2):
    for metric in ("exact_match", "exact_match/corners", "exact_match/group"):
      assert 0.0 <= results[f"shapes_textqa/{k}shot/{metric}"] <= 1.0
  assert not any(k.startswith("shapes_text_ppl/2shot") for k in results)
  saved = json.loads((tmp_path / "eval" / "step_3.json").read_text())
  assert saved["info"]["shapes_textqa"] == {"test_examples": SPEC.num_textqa_test}
  assert saved["info"]["shapes_vqa"]["train_overlap"] == 0
  samples = json.loads((tmp_path / "eval" / "step_3_samples.json").read_text())
  assert samples["shapes_textqa/2shot"][0]["question"].startswith("Question: how many corners")


def test_regressions_in_nll_are_rises_and_perplexity_is_not_gated_twice(tmp_path):
  for step, (ppl, acc) in ((0, (9.0, 0.5)), (50, (7.0, 0.5)), (100, (7.7, 0.5)), (150, (9.0, 0.5))):
    (tmp_path / f"step_{step}.json").write_text(json.dumps({"step": step, "results": {
        "t/0shot/perplexity": ppl, "t/0shot/nll": float(np.log(ppl)), "v/0shot/accuracy": acc}}))
  assert report.find_regressions(tmp_path, 0.05, steps=[50]) == []  # a fall is an improvement
  # Step 100: perplexity rose 10 %, nll 4.9 %: under the 5 % gate, and perplexity is not gated.
  assert report.find_regressions(tmp_path, 0.05, steps=[100]) == []
  found = report.find_regressions(tmp_path, 0.05, steps=[150])
  assert [r["metric"] for r in found] == ["t/0shot/nll"]  # nll rose 12.9 %
  assert found[0]["best"] == pytest.approx(np.log(7.0)) and found[0]["drop"] == pytest.approx(np.log(9) / np.log(7) - 1)
