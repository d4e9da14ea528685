"""The package reads as its architecture: no import circles, and no import that runs back up
(stages below loops, engines below methods below stages, nothing below the CLI imports a loop)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "opdcli"

# lower number = lower layer; a module may import only its own layer or below
LAYERS = {
    "errors": 0, "config": 1, "config_io": 1, "signals": 1, "losses": 1, "changepoint": 1, "segments": 1, "grading": 1,
    "toy": 1, "freshness": 1, "dist": 2, "data": 2, "models": 2, "lm": 2, "lora": 2, "optim": 2, "precision": 2, "records": 3, "engines": 3,
    "methods": 4, "objective": 5, "learner": 5, "validate": 5, "doctor": 5, "stages": 6, "assembly": 6, "run": 7,
    "loops": 8, "cli": 9, "__init__": 0,
}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    assert top in LAYERS, f"opdcli.{top} has no layer in tests/test_layers.py; add it"
    return LAYERS[top]


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opdcli."):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("opdcli.")}
        out[name] = targets
    return out


def test_no_upward_imports():
    bad = [f"{m} -> {t}" for m, ts in _imports().items() for t in ts
           if _layer(t) > _layer(m) and not t.startswith(m + ".")]
    assert bad == [], "imports that run back up: " + ", ".join(sorted(bad))


def test_no_loop_imports_another_loop():
    bad = [f"{m} -> {t}" for m, ts in _imports().items() if m.startswith("opdcli.loops.") for t in ts
           if t.startswith("opdcli.loops.") and t != m]
    assert bad == [], ", ".join(bad)


def test_no_import_circles():
    graph = {m: {t for t in ts if t != m} for m, ts in _imports().items()}
    seen, stack, cycles = set(), [], []

    def visit(v, on_path):
        on_path.add(v)
        stack.append(v)
        for w in graph.get(v, ()):
            if w in on_path:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w, on_path)
        stack.pop()
        on_path.discard(v)
        seen.add(v)

    for v in graph:
        if v not in seen:
            visit(v, set())
    assert cycles == [], cycles
