"""Every `--config.KEY=VALUE` that README.md, docs/ or a config's docstring tells users to type parses with the
config it is meant for, through the same ml_collections flag that scripts/train.py defines (issue 13, item 6: a
plain `None` default refuses every command-line value, so documented keys must be typed placeholders)."""

import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.py"))]
OVERRIDE = re.compile(r"--config\.([A-Za-z0-9_.]+)(?:=([^\s`|)'\"]*))?")
CONFIG_FILE = re.compile(r"configs/([a-z0-9_]+\.py)(:[^\s`]+)?")
ALL_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                     if "def get_config" in p.read_text())
ENV = {"$TFDS_DATA_DIR": "/data/tfds"}


def parse(config_file: str, overrides: list[str]):
  """The config as `scripts/train.py --config configs/CONFIG_FILE OVERRIDES...` sees it."""
  argv = ["train.py", f"--config={ROOT / 'configs' / config_file}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def has_key(config, key):
  *parents, leaf = key.split(".")
  for parent in parents:
    if parent not in config:
      return False
    config = config[parent]
  return leaf in config


def documented_overrides():
  """(document:line, config files, key, value or None) for every override in the documents. The configs are the
  ones named on the same (backslash-joined) command line; else the document itself when it is a config; else
  every config that has the key."""
  found = []
  for document in DOCUMENTS:
    text = document.read_text().replace("\\\n", " ")
    for number, line in enumerate(text.splitlines(), 1):
      for match in OVERRIDE.finditer(line):
        key, value = match.group(1).rstrip("."), match.group(2)
        if key in ("KEY",):  # a generic `--config.KEY=VALUE` in prose
          continue
        named = [m.group(1) + (m.group(2) or "") for m in CONFIG_FILE.finditer(line)]
        if not named and document.name in ALL_CONFIGS:
          named = [document.name]
        if value and "$" in value and not any(variable in value for variable in ENV):
          value = None  # a shell variable (`for seed in 0 1 2; do ... --config.seed=$seed`): check the key's type
        found.append((f"{document.relative_to(ROOT)}:{number}", named, key, value or None))
  return found


OVERRIDES = documented_overrides()


def test_the_documents_have_overrides_to_check():
  keys = {key for _, _, key, _ in OVERRIDES}
  assert {"mesh.data", "mesh.expert", "data.data_dir", "init.checkpoint", "model.moe.num_experts"} <= keys, keys


@pytest.mark.parametrize("where,named,key,value", OVERRIDES, ids=[f"{w}:{k}" for w, _, k, _ in OVERRIDES])
def test_documented_override_is_settable(where, named, key, value):
  configs = named or [name for name in ALL_CONFIGS if has_key(parse(name, []), key)]
  assert configs, f"{where}: no config has the documented key config.{key}"
  for config_file in configs:
    if value is None:  # named without a value: it must take one of its type (a plain None takes none)
      config = parse(config_file, [])
      assert has_key(config, key), f"{where}: {config_file} has no key config.{key}"
      *parents, leaf = key.split(".")
      for parent in parents:
        config = config[parent]
      assert config.get_type(leaf) is not type(None), f"{where}: {config_file}'s config.{key} is a plain None"
      continue
    for variable, replacement in ENV.items():
      value = value.replace(variable, replacement)
    config = parse(config_file, [f"--config.{key}={value}"])
    resolved = config
    for part in key.split("."):
      resolved = resolved[part]
    assert str(resolved) == value or resolved == type(resolved)(value), (where, config_file, key, resolved)
