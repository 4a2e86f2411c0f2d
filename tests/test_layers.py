"""The package's arrows point one way (`shoestring.LAYERS`): no import cycle inside `shoestring`,
no import from a lower layer into a higher one. Imports are read with `ast`, so one written
inside a function counts like one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import shoestring
from shoestring import LAYERS

ROOT = Path(shoestring.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(module of shoestring imported, line) for every import in the file, wherever it stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from shoestring.plan import probe` imports the module shoestring.plan.probe
            found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno) for a in node.names]
    return list(dict.fromkeys((m, line) for m, line in found if m in MODULES))


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    """The index in LAYERS of the top-level name the module belongs to (None: the package root,
    which holds only the version and LAYERS)."""
    if module == "shoestring":
        return None
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"shoestring.{top} has no place in shoestring.LAYERS: add it to the layer it belongs to")


def test_every_module_has_a_layer_and_the_list_names_only_real_ones():
    for module in MODULES:
        _layer(module)
    tops = {m.split(".")[1] for m in MODULES if m != "shoestring"}
    named = [n for names in LAYERS for n in names]
    assert len(named) == len(set(named)), "a name stands in two layers"
    assert set(named) <= tops, f"LAYERS names what does not exist: {sorted(set(named) - tops)}"


def test_no_import_points_up():
    upward = []
    for module, imports in GRAPH.items():
        for imported, line in imports:
            low, high = _layer(imported), _layer(module)
            if low is not None and high is not None and low > high:
                upward.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} ({'/'.join(LAYERS[high])}) "
                              f"imports {imported} ({'/'.join(LAYERS[low])}), a higher layer")
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def _cycle() -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for nxt, _ in GRAPH[m]:
            if state.get(nxt) == 1 and nxt != m:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in GRAPH:
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """An import written inside a function is read; an upward one, and the cycle it closes, fail."""
    local = tmp_path / "fake.py"
    local.write_text("def f():\n    from shoestring.train import trainer\n    return trainer\n")
    assert _imports("shoestring.models.fake", local) == [("shoestring.train.trainer", 2)]
    graph = {**GRAPH, "shoestring.models.llama": [*GRAPH["shoestring.models.llama"], ("shoestring.train.trainer", 2)]}
    monkeypatch.setitem(globals(), "GRAPH", graph)
    assert _cycle() is not None
    try:
        test_no_import_points_up()
    except AssertionError as err:
        assert "shoestring.models.llama (models) imports shoestring.train.trainer (train)" in str(err)
    else:
        raise AssertionError("an upward import went unnoticed")
