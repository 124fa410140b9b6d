"""The code's structure: layers that import downwards only, no import loops, training and serving
apart, modules of one sitting, every setting described (tests/integration/test_layout_processes.py
runs the import-collision and start-up checks in fresh processes)."""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
# Where each repository folder is installed (pyproject.toml's package-dir).
PACKAGES = {"fax": ROOT / "fax", "fax.models": ROOT / "models", "fax.parallel": ROOT / "parallel"}
# Layers from the bottom; a module may import its own layer's modules (without loops) and those below.
LAYERS = [
    ("fax.models",),
    ("fax.parallel",),
    ("fax.config", "fax.signals", "fax.metrics"),
    ("fax.checkpoint", "fax.data", "fax.params", "fax.interop", "fax.cluster"),
    ("fax.train", "fax.serving"),
    ("fax.cli", "fax"),
]
APART = ("fax.train", "fax.serving")  # never import each other
# Imported inside functions only where they are heavy and optional (or, for the CLI, where it keeps
# `fax --help` free of jax): anything else is imported at the top of its module.
LAZY_OK = ("ray", "transformers", "torch", "matplotlib", "wandb", "tensorboardX", "pyarrow",
           "fax.cluster.data", "fax.train.ray_runtime", "fax.serving.cluster_engine")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "fax" and parts[0] in ("models", "parallel"):
                continue
            found[name] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(module imported, whether inside a function) of fax's own modules and the lazy packages."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from fax.data import chat`` imports the module fax.data.chat; ``from fax.data import Batch``,
            # the package fax.data: ``owner`` keeps the longest name that is a module
            targets = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(t, id(node) in functions) for t in targets]
    return out


def owner(module: str, known: dict[str, Path]) -> str | None:
    """The fax module an import names (``fax.data.Batch`` -> ``fax.data``), if it is one."""
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def layer(module: str) -> int:
    best = max((p for group in LAYERS for p in group if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = {o for target, _ in imports(path, name) if (o := owner(target, known)) and o != name}
    return edges


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_downwards_and_training_and_serving_stay_apart():
    edges = graph()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
              if layer(b) > layer(a) and not (a.startswith("fax.") and b == "fax")]
    assert not upward, "imports from a lower layer into a higher one: " + ", ".join(sorted(upward))
    train, serving = APART
    crossing = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
                if {a.split(".")[1] if "." in a else a, b.split(".")[1] if "." in b else b} == {"train", "serving"}]
    assert not crossing, "training and serving import each other: " + ", ".join(crossing)


def test_function_level_imports_only_for_optional_heavy_packages():
    found = []
    for name, path in modules().items():
        for target, inside in imports(path, name):
            if inside and not name.startswith("fax.cli") and name != "fax" and not any(
                    target == ok or target.startswith(ok + ".") for ok in LAZY_OK):
                found.append(f"{name}: {target}")
    assert not found, "imports inside functions: " + ", ".join(sorted(set(found)))


def test_the_graph_sees_the_layers_it_checks():
    """A test that checks nothing passes too: the graph must hold the edges the layering is about."""
    edges = graph()
    assert "fax.params" in edges["fax.train.step"] and "fax.models" in edges["fax.parallel.rules"] | {"fax.models"}
    assert "fax.serving.engine" in edges["fax.serving.http"] and len(edges) > 40
    assert layer("fax.train.loop") == layer("fax.serving.engine") > layer("fax.data.prepare") > layer("fax.config")


def test_no_module_is_more_than_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_fax_config_lists_every_setting_with_its_default_and_a_description():
    from fax.cli.config import settings
    from fax.config import Config, apply_overrides

    listed = settings()
    keys = [s.key for s in listed]
    assert len(keys) == len(set(keys)) and {"model.d_model", "train.steps", "logging.tensorboard", "seed"} <= set(keys)
    missing = [s.key for s in listed if not s.description]
    assert not missing, f"settings without a description: {missing}"
    # Every listed default, fed back as an override, is the default it lists.
    for s in listed:
        assert apply_overrides(Config(), [f"{s.key}={s.default}"]) == Config(), s
