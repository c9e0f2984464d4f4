"""ARCHITECTURE.md: each layer imports only from layers below it (checked on the source, statically)."""

from __future__ import annotations

import ast
from pathlib import Path

import gradient_nb

ROOT = Path(gradient_nb.__file__).parent
# What each layer may import from the package; helpers (bench, testing, cli) compose everything.
BELOW = {
    "mesh": set(),
    "models": set(),
    "serve": {"mesh", "models"},
    "verify": {"mesh", "models", "serve"},
    "rl": {"mesh", "models", "serve", "verify"},
    "agents": {"mesh", "models", "serve", "verify"},
    "notebook": {"mesh", "models", "serve", "verify", "rl", "agents"},
}


def _imported_layers(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("gradient_nb."):
                out.add(node.module.split(".")[1])
            elif node.level == 2 and node.module:  # from ..layer import x, inside gradient_nb/<layer>/
                out.add(node.module.split(".")[0])
            elif node.level == 2:  # from .. import layer
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gradient_nb."))
    return out


def test_layers_import_only_from_below() -> None:
    problems = []
    for layer, allowed in BELOW.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for other in _imported_layers(path) - allowed - {layer}:
                if other in BELOW:
                    problems.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not problems, problems


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from ..verify.service import VerifyManager\nimport gradient_nb.notebook.session\n")
    assert _imported_layers(bad) == {"verify", "notebook"}
