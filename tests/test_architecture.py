"""The layout's rules, read from the source: imports go mumu_assets -> eval -> mumu_model, the toy
world is reached only through its plugin points, and no code branches on a profile's name."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mumu_model", "eval", "mumu_assets")
# The modules allowed to import the toy world: the world itself and the graph's toy profile.
TOY_PLUGIN_POINTS = ("mumu_model/toy/", "mumu_assets/profiles/toy.py")


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports (relative imports resolved)."""
    package = path.relative_to(REPO).parent.parts  # what `from .x import y` is relative to
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    found.add(".".join((*base, node.module)))
                else:  # `from . import x`: x is a module of the package
                    found.update(".".join((*base, alias.name)) for alias in node.names)
            elif node.module:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("package, forbidden", [("mumu_model", ("eval", "mumu_assets")), ("eval", ("mumu_assets",))])
def test_imports_go_one_way(package, forbidden):
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in _modules(package)
             for name in _imports(path) if name.split(".")[0] in forbidden]
    assert not wrong, wrong


def test_only_the_plugin_points_import_the_toy_world():
    importers = [f"{path.relative_to(REPO)} imports {name}" for package in PACKAGES for path in _modules(package)
                 for name in _imports(path) if name.startswith("mumu_model.toy")
                 and not path.relative_to(REPO).as_posix().startswith(TOY_PLUGIN_POINTS)]
    assert not importers, importers


def test_the_testing_module_is_for_tests_only():
    importers = [f"{path.relative_to(REPO)}" for package in PACKAGES for path in _modules(package)
                 if "mumu_model.testing" in _imports(path)]
    assert not importers, importers


def test_no_code_compares_with_a_profile_name():
    """Profiles differ by their resources and params, never by an `if profile == "toy"`."""
    names = {"toy", "paper", "tiny"}
    branches = []
    for package in PACKAGES:
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare):
                    constants = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                    if names & {c for c in constants if isinstance(c, str)}:
                        branches.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not branches, branches


def test_the_eval_commands_and_the_toy_world_are_registered_entry_points():
    from importlib.metadata import entry_points

    assert {e.name for e in entry_points(group="mumu.commands")} >= {"eval"}
    assert {e.name for e in entry_points(group="mumu.worlds")} >= {"toy"}
