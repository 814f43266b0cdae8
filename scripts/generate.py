"""Samples text from the latest checkpoint of a language-model training workdir, with the KV cache.

    python scripts/generate.py --workdir workdirs/lm_moe --prompt "ROMEO:" --length 200 --temperature 0.8 \
        [--top_k 40] [--seed 0] [--num_samples 1] [--step N]

The prompt is encoded with the workdir's tokenizer (config.data: bytes by default), run through the model in one
call, then `length` tokens are sampled one at a time (vimoe.models.lm.generate). --temperature 0 is greedy. The
prompt and continuation are printed to stdout; a one-line header (workdir, step, sampling settings) goes to
stderr. With RoPE a sample may be longer than the model's context (model.max_length): attention then reaches back
model.max_length tokens, as in training. With learned positions prompt + length must fit in model.max_length.
"""

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A language-model workdir written by scripts/train.py.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue; empty: start a new document (end-of-text token).")
_LENGTH = flags.DEFINE_integer("length", 200, "Tokens to sample after the prompt.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only (default: all).",
                              lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples, decoded as one batch.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  import jax
  import numpy as np
  from vimoe.data.text import get_tokenizer
  from vimoe.models.lm import LanguageModel, generate
  from vimoe.train import load_for_evaluation

  config, _, model, step = load_for_evaluation(_WORKDIR.value, _STEP.value)
  if not isinstance(model, LanguageModel):
    raise app.UsageError(f"config.model.name={config.model.get('name')!r} in {_WORKDIR.value} has no cached "
                         "decoding; generate.py samples from model.name 'transformer' or 'umoe'")
  tokenizer = get_tokenizer(config.data)
  prompt_ids = tokenizer.encode(_PROMPT.value) if _PROMPT.value else list(tokenizer.eos_ids)
  total = len(prompt_ids) + _LENGTH.value
  if model.config.positions == "learned" and total > model.config.max_length:
    raise app.UsageError(f"prompt ({len(prompt_ids)} tokens) + --length={_LENGTH.value} = {total} exceeds the "
                         f"learned position table (model.max_length={model.config.max_length}); shorten them")
  print(f"# {_WORKDIR.value} step {step}: temperature {_TEMPERATURE.value}, top_k {_TOP_K.value}, "
        f"seed {_SEED.value}", file=sys.stderr, flush=True)
  prompt = np.tile(np.asarray(prompt_ids, np.int32), (_NUM_SAMPLES.value, 1))          # [samples, P]
  tokens, _ = generate(model, prompt, _LENGTH.value, rng=jax.random.PRNGKey(_SEED.value),
                       temperature=_TEMPERATURE.value, top_k=_TOP_K.value)
  for index, row in enumerate(np.asarray(tokens)):
    if index:
      print("\n" + "-" * 40)
    text = tokenizer.decode(row.tolist())
    print(text if _PROMPT.value else text[len(tokenizer.decode(prompt_ids)):])


if __name__ == "__main__":
  app.run(main)
