"""The floor plan, enforced: layers import downwards only, no import cycles, imports at the top.

    app      vlp.app.*  (the `vlp` command, demo, launch, the train-time eval hook)
    curation vlp.data_tools.curation.*  (embed and curate shards: reads shards as training does,
             encodes with eval's model loader, matches eval suites' images)
    shards | train | eval   each uses the core, none imports another
    core     vlp.core.*  (errors, config schemas, atomic writes, fetch, image decoding,
             distributed helpers, models, weights, tar format, the synthetic world)

Read from the sources with `ast`, so a lazy import inside a function cannot hide an
arrow. Imports inside functions are allowed only where named below, with the reason.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import name (pyproject's package-dir).
PACKAGES = {"vlp": "vlp", "data_tools": "vlp.data_tools", "eval": "vlp.eval"}
TRAIN = {"vlp.data", "vlp.sources", "vlp.plan", "vlp.losses", "vlp.gradcache", "vlp.train", "vlp.checkpoint",
         "vlp.export", "vlp.schedule", "vlp.dsconfig", "vlp.speedups", "vlp.augment", "vlp.tokendrop"}
RANK = {"core": 0, "shards": 1, "train": 1, "eval": 1, "curation": 2, "app": 3}

# Third-party imports that may sit inside functions: heavy or optional ones whose import
# has a cost or a side effect the caller must control.
LAZY_THIRD_PARTY = {
    "deepspeed",  # picks its accelerator when imported: only after DS_ACCELERATOR is set
    "torch.utils.tensorboard",  # optional extra (vlp[tensorboard])
    "wandb",  # optional extra (vlp[wandb]); slow to import, starts a service process on init
    "torchvision.transforms",  # only for colour jitter, off by default
    "matplotlib",  # report plots only; slow to import
    "matplotlib.pyplot",
    "pyarrow.parquet",
    "accelerate",  # optional: only under `accelerate launch`
    "ray",  # optional extra (vlp[ray]): only with `vlp shards build --engine ray`
    "faiss",  # optional extra (vlp[curate]): only for semantic dedup and decontamination
    "langdetect",  # optional extra (vlp[curate]): only for the languages filter
}
# Project imports that may sit inside functions: the `vlp` entry point imports a command's
# module only when that command runs, so `vlp --help` and `vlp shards ...` never load
# torch or DeepSpeed and a config error is reported before any heavy import.
LAZY_PROJECT = {"vlp.app.cli"}


def layer(module: str) -> str:
    if module.startswith(("vlp.app", "vlp.__main__")):
        return "app"
    if module.startswith("vlp.data_tools.curation"):
        return "curation"
    if module.startswith("vlp.data_tools"):
        return "shards"
    if module.startswith("vlp.eval"):
        return "eval"
    if module in TRAIN:
        return "train"
    assert module == "vlp" or module.startswith("vlp.core"), f"{module}: in no layer; add it to one"
    return "core"


def modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def imports(path: Path, module: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            out.append((name, id(node) in inner, node.lineno))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    lazy: list[str] = []
    for module, path in mods.items():
        for name, inside, line in imports(path, module):
            target = name if name in mods else None
            if name.startswith("vlp") and target is None:
                continue  # `from vlp.x import Name`: the module itself is listed separately
            if target:
                edges[module].add(target)
                if inside and module not in LAZY_PROJECT:
                    lazy.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
            elif inside and not name.startswith("vlp") and not any(
                name == t or name.startswith(t + ".") for t in LAZY_THIRD_PARTY
            ):
                top = name.split(".")[0]
                if top not in ("__future__",) and name.rpartition(".")[0] not in LAZY_THIRD_PARTY:
                    lazy.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    return edges, lazy


def test_every_module_is_in_a_layer():
    for module in modules():
        layer(module)


def test_imports_point_down_only():
    edges, _ = graph()
    wrong = [
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, targets in edges.items()
        for b in targets
        if layer(a) != layer(b) and RANK[layer(b)] >= RANK[layer(a)]
    ]
    assert wrong == []


def test_no_import_cycles():
    edges, _ = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(modules()):
        if v not in index:
            visit(v)
    # A package's __init__ importing its own submodules is not a circle through the package.
    cycles = [c for c in cycles if not all(m.startswith(c[0]) for m in c)]
    assert cycles == []


def test_imports_sit_at_the_top_of_files():
    _, lazy = graph()
    assert lazy == []


def test_the_checker_sees_a_back_arrow_and_a_lazy_import(tmp_path):
    source = "def f():\n    from vlp.app import cli\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    found = imports(path, "vlp.core.m")
    assert ("vlp.app.cli", True, 2) in found
    assert layer("vlp.core.m") == "core" and RANK[layer("vlp.app.cli")] > RANK["core"]
