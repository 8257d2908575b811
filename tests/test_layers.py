"""The layers of docs/architecture.rst, checked against the real import graph."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "thpguard"

# Bottom first; a module may import only from its own layer or below.
LAYERS = [
    {"errors", "_native", "_cffi", "_version", "_child"},
    {"_fork", "_forksignals"},
    {"kernel"},
    {"blocks", "pagemap", "events", "_refusals", "repair"},
    {"backends", "_regions", "_copy", "region"},
    {"_guardstate", "guard", "hot", "stats"},
    {"metrics", "_textfile", "launch", "numpy"},
    {"_procmap", "_checks", "_hugechecks", "_selftest", "_cliguard", "_cliverify", "cli", "__main__",
     "agent", "_agentscan", "_agentconfig", "_agentops", "_agentmetrics", "_cliagent"},
]


def _layer(name):
    return next(i for i, names in enumerate(LAYERS) if name in names)


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                yield node.module.split(".")[0]
            elif node.level == 1:
                yield from (a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("thpguard."):
                yield node.module.split(".")[1]
            elif node.level == 0 and node.module == "thpguard":
                yield from (a.name for a in node.names)


def test_every_module_imports_downward_only():
    """No module imports from a layer above its own (lazy imports included)."""
    wrong = []
    for path in sorted(PKG.glob("*.py")):
        if path.stem == "__init__":
            continue
        here = _layer(path.stem)
        for name in _imports(path):
            if name == "__version__":
                continue
            if _layer(name) > here:
                wrong.append(f"{path.stem} imports {name}")
    assert not wrong


def test_no_module_is_over_500_lines():
    """Each module stays small enough to hold one responsibility."""
    long = {p.name: n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500 and p.name != "_version.py"}
    assert not long
