"""Every dependency points one way: moe <- parallel <- models <- train <- scripts, with analysis beside models.
The packages below the trainer (and the data, the checkpoint import and the analysis) never import vimoe.train,
not even inside a function."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BELOW_TRAIN = ("analysis", "checkpoints", "data", "models", "moe", "parallel")


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module an `import` or `from ... import` anywhere in the file names (the names of a `from vimoe import
  x` count as vimoe.x)."""
  modules = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      modules.add(node.module)
      modules.update(f"{node.module}.{alias.name}" for alias in node.names)
  return modules


@pytest.mark.parametrize("package", BELOW_TRAIN)
def test_package_does_not_import_train(package):
  files = sorted((ROOT / "vimoe" / package).rglob("*.py"))
  assert files, f"vimoe/{package} has no Python files"
  upward = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                if name == "vimoe.train" or name.startswith("vimoe.train."))
            for path in files}
  assert not {path: names for path, names in upward.items() if names}


def test_the_scan_sees_every_import_form(tmp_path):
  source = tmp_path / "example.py"
  source.write_text("import vimoe.train.trainer\nfrom vimoe import train\n\ndef f():\n  from vimoe.train.sweep import x\n")
  assert {"vimoe.train.trainer", "vimoe.train", "vimoe.train.sweep"} <= imported_modules(source)
