"""The package's layering rule (docs/architecture.md), held by parsing every module's imports.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, and `importlib.import_module("compress...")`
strings. A module may import modules of its own layer or of a layer below it; never one above, and never in a circle.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom up. The first matching prefix names a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("compress.core",)),
    ("kernels", ("compress.kernels",)),
    ("model", ("compress.model",)),
    ("layers", ("compress.layers",)),
    ("formats", ("compress.formats",)),
    ("sources", ("compress.sources",)),
    ("pipeline", ("compress.pipeline",)),
    ("train", ("compress.train",)),
    ("quant", ("compress.quant",)),
    ("sparse", ("compress.sparse",)),
    ("methods", ("compress.methods",)),
    ("evals", ("compress.evals",)),
    ("runs", ("compress.runs",)),
    ("api", ("compress.api",)),
    ("cli", ("compress.cli", "compress")),
]
# Installed, methods/ and evals/ are compress.methods and compress.evals (pyproject's package-dir).
ROOTS = {"compress": "compress", "compress.methods": "methods", "compress.evals": "evals"}


def modules(repo: Path) -> dict[str, tuple[Path, bool]]:
    found: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in ROOTS.items():
        for f in sorted((repo / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(repo / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([pkg, *parts])] = (f, f.name == "__init__.py")
    return found


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS and docs/architecture.md")


def imports(repo: Path) -> list[tuple[str, str, Path, int]]:
    """(importer, imported module, file, line) for every import of a compress module, at any depth."""
    mods = modules(repo)

    def target(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = []
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            for n in names:
                t = target(n) if n.startswith("compress") else None
                if t and t != mod:
                    edges.append((mod, t, path, node.lineno))
    return edges


def violations(repo: Path) -> list[str]:
    """Every upward import (file:line, both layers) and every import circle."""
    edges = imports(repo)
    out = []
    for src, dst, path, line in edges:
        if layer_of(dst) > layer_of(src):
            out.append(f"{path.relative_to(repo)}:{line}: {src} ({LAYERS[layer_of(src)][0]}) imports {dst} "
                       f"({LAYERS[layer_of(dst)][0]}), a higher layer")
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges:
        graph.setdefault(src, set()).add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(f"import circle: {' -> '.join(sorted(comp))}")

    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer():
    for mod in modules(REPO):
        layer_of(mod)


def test_layers_are_one_way_and_circle_free():
    bad = violations(REPO)
    assert not bad, "\n".join(bad)


def test_a_planted_back_import_is_caught(tmp_path):
    for folder in ROOTS.values():
        shutil.copytree(REPO / folder, tmp_path / folder)
    errors = tmp_path / "compress" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from compress.runs.results import read_records\n")
    line = len(errors.read_text().splitlines())
    bad = violations(tmp_path)
    assert any(b.startswith(f"compress/core/errors.py:{line}: ") and "compress.runs.results" in b for b in bad), bad


def test_a_planted_circle_is_caught(tmp_path):
    for folder in ROOTS.values():
        shutil.copytree(REPO / folder, tmp_path / folder)
    paths = tmp_path / "compress" / "core" / "paths.py"
    paths.write_text(paths.read_text() + "\nimport importlib\nimportlib.import_module('compress.core.config')\n")
    cfg = tmp_path / "compress" / "core" / "config.py"
    cfg.write_text(cfg.read_text() + "\nfrom compress.core import paths\n")
    assert any(b.startswith("import circle:") and "compress.core.config" in b for b in violations(tmp_path))


def test_cli_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import compress.cli as c; "
            "from click.testing import CliRunner; r = CliRunner().invoke(c.main, ['--help']); "
            "assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'transformers', 'compress.methods.gptq') if m in sys.modules]; "
            "print('imported:', bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
