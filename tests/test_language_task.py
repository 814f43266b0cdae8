"""The language-model task: masked cross-entropy against NumPy, evaluation sums that give the same perplexity as one
NumPy pass, and the one trainer on a tiny LSTM-MoE (eval/ppl in metrics.jsonl, resume from a checkpoint)."""

import importlib.util
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.lstm_moe_quickstart import get_config
from vimoe.train import trainer
from vimoe.train.language import LanguageModeling

ROOT = pathlib.Path(__file__).resolve().parent.parent
V = 7


class TableModel:
  """logits[b, t] = table[tokens[b, t]]: a model whose outputs the test knows, with fixed aux losses and metrics
  (called eagerly by the task, like a model under the trainer's jit)."""

  def __init__(self, table, aux):
    self.table = jnp.asarray(table, jnp.float32)
    self.aux = aux

  def __call__(self, tokens, *, deterministic=True, mask=None):
    del deterministic, mask  # its fixed aux stands for routing statistics already restricted to the mask
    return self.table[tokens], self.aux


def numpy_nll(table, inputs, targets):
  """-log softmax(table[inputs])[targets], float64, per token."""
  logits = np.asarray(table, np.float64)[inputs]                           # [B, T, V]
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def random_batch(rng, batch=3, length=5, padded=0):
  inputs = rng.randint(0, V, (batch, length)).astype(np.int32)
  targets = rng.randint(0, V, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.float32)
  if padded:
    mask.reshape(-1)[-padded:] = 0.0
  return {"inputs": inputs, "targets": targets, "mask": mask}


def test_training_loss_is_masked_cross_entropy_plus_aux_losses():
  rng = np.random.RandomState(0)
  table = rng.randn(V, V)
  model = TableModel(table, {"losses": {"importance": jnp.asarray(0.25), "load": jnp.asarray(0.5)},
                             "metrics": {"block1": {"load_cv": jnp.asarray(2.0), "expert_load": jnp.ones(4) / 4}}})
  batch = random_batch(rng, padded=4)
  config = ml_collections.ConfigDict({"label_smoothing": 0.0})
  loss, metrics = LanguageModeling().loss(model, batch, config)
  nll = numpy_nll(table, batch["inputs"], batch["targets"])
  want = np.sum(nll * batch["mask"]) / np.sum(batch["mask"])              # mean over the 11 mask-1 tokens
  assert float(metrics["train/task_loss"]) == pytest.approx(want, rel=1e-5)
  assert float(loss) == pytest.approx(want + 0.75, rel=1e-5)
  assert float(metrics["train/aux/load"]) == 0.5 and float(metrics["train/block1/load_cv"]) == 2.0


def test_evaluation_over_two_batches_matches_one_numpy_pass():
  rng = np.random.RandomState(1)
  table = rng.randn(V, V)
  task = LanguageModeling()
  batches = [random_batch(rng), random_batch(rng, padded=6)]               # 15 and 9 real tokens
  load_cvs = [1.0, 3.0]
  sums = None
  for batch, load_cv in zip(batches, load_cvs):
    model = TableModel(table, {"losses": {}, "metrics": {"block1": {
        "load_cv": jnp.asarray(load_cv), "expert_load": jnp.asarray([load_cv, 0.0]), "capacity": jnp.asarray(3)}}})
    out = jax.device_get(task.eval_batch(model, batch))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  summary = task.summarize(sums)
  nll = np.concatenate([numpy_nll(table, b["inputs"], b["targets"])[b["mask"] == 1] for b in batches])
  assert len(nll) == 24 and summary["eval/tokens"] == 24
  assert summary["eval/loss"] == pytest.approx(nll.mean(), rel=1e-5)
  assert summary["eval/ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
  assert summary["eval/bits_per_token"] == pytest.approx(nll.mean() / math.log(2), rel=1e-5)
  # Routing statistics: averaged over batches weighted by their real tokens, (15 * 1 + 9 * 3) / 24 = 1.75.
  assert summary["eval/block1/load_cv"] == pytest.approx(1.75)
  assert summary["eval/block1/expert_load"] == pytest.approx([1.75, 0.0])
  assert "eval/block1/capacity" not in summary


def tiny_config(**overrides):
  config = get_config()
  config.unlock()
  config.update(batch_size=4, eval_batch_size=8, total_steps=4, log_every=1, eval_every=4, checkpoint_every=1)
  config.data.update(seq_len=16, max_eval_batches=2)
  config.model.update(dim=16, dropout=0.1)
  # Einsum dispatch (no capacity, so nothing is dropped) compiles faster than the dropless gather path.
  config.model.moe.update(num_experts=4, k=2, hidden_dim=16, dispatch="einsum")
  config.optim.warmup_steps = 1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_writes_perplexity_and_resumes_from_a_checkpoint(tmp_path, capsys):
  config = tiny_config()
  final = trainer.train_and_evaluate(config, tmp_path)
  straight = read_metrics(tmp_path)
  assert [m["step"] for m in straight] == [1, 2, 3, 4, 4]
  assert straight[-1]["eval/ppl"] == pytest.approx(final["eval/ppl"])
  assert straight[-1]["eval/ppl"] == pytest.approx(math.exp(straight[-1]["eval/loss"]))
  assert math.isfinite(final["eval/ppl"]) and final["eval/tokens"] == 2 * 8 * 16
  assert len(final["eval/block1/expert_load"]) == 4
  assert {"train/aux/importance", "train/aux/load", "train/block1/load_cv"} <= set(straight[0])
  # Lose the last checkpoint, as if the run had been killed after step 3: the rerun resumes (model, optimizer and
  # data iterator) and redoes step 4. One step keeps it to one compilation of the train step.
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  capsys.readouterr()
  resumed_final = trainer.train_and_evaluate(config, tmp_path)
  assert "Resumed from step 3" in capsys.readouterr().out
  resumed = read_metrics(tmp_path)
  assert [m["step"] for m in resumed] == [m["step"] for m in straight]
  for a, b in zip(straight, resumed):
    for key in a:
      if key != "train/examples_per_sec":
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
  assert resumed_final["eval/ppl"] == pytest.approx(final["eval/ppl"], rel=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("model.name", "gpt", r"config\.model\.name='gpt' is not a language model; valid: transformer, umoe, lstm_moe"),
    ("model.vocab_size", 100, r"config\.model\.vocab_size=100 is smaller than the 256 tokens"),
])
def test_model_config_errors_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    LanguageModeling().build_model(tiny_config(**{key: value}), nnx.Rngs(0))


def test_data_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config\.seq_len=0"):
    LanguageModeling().build_data(tiny_config(**{"data.seq_len": 0}), "train", train=True, seed=0, batch_size=4)


def test_pretrained_weights_are_refused():
  config = tiny_config()
  config.init = ml_collections.ConfigDict({"checkpoint": "/some/dinov2.npz"})
  with pytest.raises(ValueError, match=r"config\.init\.checkpoint='/some/dinov2\.npz'.*no pretrained weights"):
    LanguageModeling().load_pretrained(None, config)


def test_table6_script_writes_only_between_the_markers(tmp_path):
  spec = importlib.util.spec_from_file_location("table6", ROOT / "scripts" / "reproduce_shazeer_table6.py")
  table6 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table6)
  results, draft = tmp_path / "results.md", tmp_path / "draft.md"
  results.write_text(f"# Results\nbefore\n{table6.START}\nold table\n{table6.END}\nafter\n")
  assert table6.write_results("new table\n", results, draft) == results
  assert results.read_text() == f"# Results\nbefore\n{table6.START}\nnew table\n{table6.END}\nafter\n"
  assert not draft.exists()
  results.write_text("# Results without markers\n")
  assert table6.write_results("new table\n", results, draft) == draft
  assert results.read_text() == "# Results without markers\n"
  assert draft.read_text() == f"{table6.START}\nnew table\n{table6.END}\n"
