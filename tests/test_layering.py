"""The floor plan, enforced: each folder is a layer, layers import downwards only, no import cycles.

    folder                  layer     may import
    vlp/app/                app       every layer below (the `vlp` command, demo, launch, eval hook)
    data_tools/curation/    curation  shards, train, eval, core (embed and curate shards: reads shards
                                      as training does, encodes with eval's model loader)
    data_tools/             shards    core (raw pairs -> shards, synthetic generator, index, verify)
    vlp/train/              train     core (trainer, losses, gradient caching; loader/ reads shards)
    eval/                   eval      core (tasks, dataset adapters, report)
    vlp/core/               core      nothing of vlp's (errors, config schemas, storage, models, ...)

The table below is the test: a module's layer is its folder's (the longest folder that holds
it), and each layer lists the layers it may import. Read from the sources with `ast`, so a lazy
import inside a function cannot hide an arrow. Imports inside functions are allowed only where
named below, with the reason.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import name (pyproject's package-dir).
PACKAGES = {"vlp": "vlp", "data_tools": "vlp.data_tools", "eval": "vlp.eval"}
# Layer -> (its packages, the layers it may import). A module belongs to the longest package holding it.
LAYERS = {
    "app": (("vlp.app", "vlp.__main__"), {"curation", "shards", "train", "eval", "core"}),
    "curation": (("vlp.data_tools.curation",), {"shards", "train", "eval", "core"}),
    "shards": (("vlp.data_tools",), {"core"}),
    "train": (("vlp.train",), {"core"}),
    "eval": (("vlp.eval",), {"core"}),
    "core": (("vlp.core", "vlp"), set()),
}

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
    "psutil",  # in the ray extra: only to end a killed build's local Ray instance
    "faiss",  # optional extra (vlp[curate]): only for semantic dedup and decontamination
    "langdetect",  # optional extra (vlp[curate]): only for the languages filter
    "igraph",  # optional extra (vlp[mine]): only for `vlp shards mine-batches`
    "leidenalg",
}
# Project imports that may sit inside functions: the `vlp` entry point imports a command's
# module only when that command runs, so `vlp --help` and `vlp shards ...` never load
# torch or DeepSpeed and a config error is reported before any heavy import.
LAZY_PROJECT = {"vlp.app.cli"}


def _within(module: str, package: str) -> bool:
    """Whole module names: vlp.data_tools is not within vlp.data."""
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str:
    best = max(((pkg, name) for name, (pkgs, _) in LAYERS.items() for pkg in pkgs if _within(module, pkg)),
               key=lambda found: len(found[0]), default=None)
    assert best is not None, f"{module}: in no layer; add its folder to LAYERS"
    return best[1]


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
        if layer(a) != layer(b) and layer(b) not in LAYERS[layer(a)][1]
    ]
    assert wrong == []


def test_each_layer_is_a_folder():
    """The train layer is vlp/train/ (loader in vlp/train/loader/), nothing of it loose in vlp/."""
    loose = [p.name for p in (ROOT / "vlp").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == []
    assert {layer(m) for m in modules()} == set(LAYERS)


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
    cycles = [c for c in cycles if not all(_within(m, c[0]) for m in c)]
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
    assert layer("vlp.core.m") == "core" and "app" not in LAYERS["core"][1]
    assert layer("vlp.data_tools.x") == "shards" and layer("vlp.data_tools.curation.x") == "curation"
    assert not _within("vlp.data_tools", "vlp.data")
