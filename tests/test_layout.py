"""
The package layout's rules (docs/layout.md): imports flow one way between the packages, no module import circle,
`import modeling_oisa` stays light, and `oisa --help` imports neither torch nor transformers.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]

# source folder -> import name (pyproject's package-dir)
PACKAGE_DIRS = {
    "modeling_oisa": "modeling_oisa",
    "modeling_refavs": "modeling_refavs",
    "processing": "processing_oisa",
    "kernels/oisa_kernels": "oisa_kernels",
    "training": "oisa_training",
    "evaluation": "oisa_evaluation",
    "hub_cards": "oisa_hub_cards",
    "cli": "oisa_cli",
    "tiny": "oisa_tiny",
}
# module prefix -> the layer it belongs to, most specific first
LAYERS = (
    ("modeling_oisa.conversion", "conversion"),
    ("modeling_oisa", "model"),
    ("modeling_refavs.conversion", "conversion"),
    ("modeling_refavs", "model"),
    ("processing_oisa.data", "data"),
    ("processing_oisa.metrics", "metrics"),
    ("processing_oisa", "processing"),
    ("oisa_kernels", "kernels"),
    ("oisa_training", "training"),
    ("oisa_evaluation", "evaluation"),
    ("oisa_hub_cards", "hub_cards"),
    ("oisa_cli", "cli"),
    ("oisa_tiny", "tiny"),
    ("train", "scripts"),
    ("eval", "scripts"),
)
# which layers each layer may import: command line and scripts -> training / evaluation -> data, metrics,
# processing -> model -> kernels
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "conversion": {"model"},
    "processing": {"model"},
    "data": {"processing", "model"},
    "metrics": {"data", "processing"},
    "tiny": {"data", "processing", "model"},
    "training": {"data", "processing", "model"},
    "evaluation": {"data", "metrics", "processing", "model"},
    "hub_cards": {"evaluation", "processing", "model"},
    "cli": {"hub_cards", "training", "evaluation", "tiny", "data", "metrics", "processing", "conversion", "model"},
    "scripts": {"cli", "hub_cards", "training", "evaluation", "data", "metrics", "processing", "model"},
}
# the imports against the flow, each only inside a function: a model loads its converter when it is asked to load an
# original checkpoint
ON_DEMAND = {
    ("modeling_oisa.modeling_oisa", "modeling_oisa.conversion.original"),
    ("modeling_refavs.modeling_refavs", "modeling_refavs.conversion"),
}
# model packages that share the model layer: modeling_refavs reuses modeling_oisa's deformable attention
MODEL_PACKAGES = ("modeling_oisa", "modeling_refavs")


def layer_of(module: str) -> str | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def source_modules() -> dict[str, Path]:
    modules = {"train": REPO / "train.py", "eval": REPO / "eval.py"}
    for folder, name in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """First-party modules `module` imports, each with whether the import is at module level."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` names a module; `from module import name` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append((target, id(node) in top_level))
    return found


@pytest.fixture(scope="module")
def import_graph() -> dict[str, list[tuple[str, bool]]]:
    modules = source_modules()
    return {module: imports_of(module, path, set(modules)) for module, path in modules.items()}


def test_every_module_belongs_to_a_layer(import_graph):
    assert [module for module in import_graph if layer_of(module) is None] == []


def test_imports_flow_one_way_between_layers(import_graph):
    against_the_flow = []
    for module, targets in import_graph.items():
        for target, at_module_level in targets:
            source_layer, target_layer = layer_of(module), layer_of(target)
            if source_layer == target_layer or target_layer in ALLOWED[source_layer]:
                continue
            if (module, target) in ON_DEMAND and not at_module_level:
                continue
            against_the_flow.append(f"{module} -> {target}")
    assert against_the_flow == []


def test_no_module_import_circle(import_graph):
    graph = {module: {target for target, _ in targets} for module, targets in import_graph.items()}
    # Tarjan's strongly connected components: any with more than one module is a circle
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def test_the_layer_rules_catch_an_upward_import(tmp_path):
    # the checker itself: a model module importing processing breaks the flow
    path = tmp_path / "modeling_oisa_probe.py"
    path.write_text("from processing_oisa.media import decode_audio\n")
    (target, _), = imports_of("modeling_oisa.probe", path, {"modeling_oisa.probe", "processing_oisa.media"})
    assert layer_of(target) not in ALLOWED[layer_of("modeling_oisa.probe")]


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return set(completed.stdout.split())


@pytest.mark.parametrize("package", MODEL_PACKAGES)
def test_importing_the_model_package_stays_light(package):
    loaded = _modules_after(f"import {package}")
    heavy = {"peft", "processing_oisa", f"{package}.conversion", "oisa_tiny", "oisa_training"}
    assert heavy & loaded == set()


def test_oisa_help_imports_neither_torch_nor_transformers():
    loaded = _modules_after(
        "from oisa_cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "oisa_cli.segment" in loaded
    assert {"torch", "transformers", "numpy"} & loaded == set()
