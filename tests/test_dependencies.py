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


# What each package may import from vimoe (itself included): moe <- parallel <- models <- train, analysis beside
# models, data on its own, checkpoints (weight import and upcycling) on top of models.
ALLOWED = {
    "moe": {"moe"},
    "parallel": {"moe", "parallel"},
    "models": {"moe", "parallel", "models"},
    "analysis": {"moe", "parallel", "models", "analysis"},
    "data": {"data"},
    "checkpoints": {"moe", "parallel", "models", "checkpoints"},
}


def vimoe_packages(names: set[str]) -> set[str]:
  """{"vimoe.models.vit", "vimoe.moe", "numpy"} -> {"models", "moe"} (bare `vimoe` is the package root: ignored)."""
  return {name.split(".")[1] for name in names if name.startswith("vimoe.")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package):
  found = {}
  for path in sorted((ROOT / "vimoe" / package).rglob("*.py")):
    wrong = vimoe_packages(imported_modules(path)) - ALLOWED[package]
    if wrong:
      found[str(path.relative_to(ROOT))] = sorted(wrong)
  assert not found, f"vimoe/{package} may import only {sorted(ALLOWED[package])}; found {found}"


def test_the_layer_check_catches_an_upward_import(tmp_path):
  source = tmp_path / "example.py"
  source.write_text("from vimoe import models\nimport vimoe.moe.routing\n")
  assert vimoe_packages(imported_modules(source)) - ALLOWED["moe"] == {"models"}
