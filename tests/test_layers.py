"""The package's layers call one way (docs/architecture.md): every `import` inside quantattn, at module level
or inside a function, goes from a layer to the same layer or one below it, and the modules of the call path
import each other without a cycle.

`python tests/test_layers.py` prints the call path's import graph, layer by layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantattn"

# Highest first. A module's layer is that of the longest prefix listed; anything else in the package is a
# tool (integrations, accuracy, bench, distributed, CLIs), above the entry layer.
LAYERS = {
    "entry: public functions": ("quantattn.api",),
    "entry: custom operators (torch.compile)": ("quantattn.ops",),
    "entry: autograd.Function": ("quantattn.autograd",),
    "entry: validation, config resolution, layout": ("quantattn.prepare", "quantattn.kvcache"),
    "dispatch: the backend registry": ("quantattn.backends.__init__",),
    "dispatch: numerics routes and grid split": ("quantattn.guards",),
    "backends": (
        "quantattn.backends.reference",
        "quantattn.backends.triton",
        "quantattn.backends.hopper",
        "quantattn.backends.sdpa",
        "quantattn.backends.speed_table",
    ),
    "backend capabilities": ("quantattn.backends.capability",),
    "launchers": (
        "quantattn.kernels.launch",
        "quantattn.kernels.decode_launch",
        "quantattn.kernels.backward_launch",
        "quantattn.hopper",
    ),
    "numerics: kernels and their reference": ("quantattn.kernels", "quantattn.reference"),
    "foundation: call and buffer types, config, settings, checks": (
        "quantattn.calls",
        "quantattn.config",
        "quantattn.settings",
        "quantattn.validation",
    ),
}
TOOLS = "tools"
ORDER = [TOOLS, *LAYERS]  # index: 0 is the top


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1]) + ".__init__" if parts[-1] == "__init__" else ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    best, best_len = TOOLS, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def resolve(name: str) -> str | None:
    """The module file a dotted import name loads (a package as its __init__), or None outside quantattn."""
    if name in MODULES:
        return name
    if name + ".__init__" in MODULES:
        return name + ".__init__"
    return None


def imports_of(module: str) -> set[str]:
    """quantattn modules that `module` imports anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text())
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if resolve(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            target = resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_no_layer_imports_a_higher_one():
    upward = [
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if ORDER.index(layer_of(t)) < ORDER.index(layer_of(m))
    ]
    assert not upward, "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (cycles)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def call_path_graph() -> dict[str, set[str]]:
    """The graph between the entry layer and the foundation (tools left out)."""
    inside = {m for m in GRAPH if layer_of(m) != TOOLS}
    return {m: GRAPH[m] & inside for m in inside}


def test_the_call_path_has_no_import_cycle():
    assert strongly_connected(call_path_graph()) == []


def test_the_entry_layer_calls_one_way():
    """api -> ops -> autograd -> prepare -> the registry: nothing below api imports it, nothing below ops
    imports ops, and the registry and backends import no entry module."""
    for m, targets in GRAPH.items():
        if m != "quantattn.__init__" and layer_of(m) != TOOLS:
            assert "quantattn.api" not in targets, m
    assert "quantattn.ops" not in GRAPH["quantattn.autograd"] | GRAPH["quantattn.prepare"]
    assert GRAPH["quantattn.prepare"].isdisjoint({"quantattn.autograd", "quantattn.ops", "quantattn.api"})


def describe() -> str:
    graph = call_path_graph()
    lines = []
    for layer in LAYERS:
        members = sorted(m for m in graph if layer_of(m) == layer)
        lines.append(f"[{layer}]")
        for m in members:
            targets = ", ".join(sorted(t.removesuffix(".__init__") for t in graph[m])) or "-"
            lines.append(f"  {m.removesuffix('.__init__')} -> {targets}")
    cycles = strongly_connected(graph)
    lines.append(f"cycles: {cycles or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
