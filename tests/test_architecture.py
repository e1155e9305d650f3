"""The house's rule, checked on the code: a room imports only from the rooms below it.

``relay/`` is built in layers (ARCHITECTURE.md, "The house"): the process on
top, then the composition root, the route table, the doors, the path every
door shares, the store, and the shared vocabulary at the bottom.  An import
that climbs (the store reaching into a door, a door into the route table) is
how a flat folder grows back; this test names the line that does it.  It
reads the imports as text (``ast``), type-only imports included: a
``TYPE_CHECKING`` import is an arrow too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Top to bottom.  A module may import from its own layer and any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("relay.server",),
    ("relay.app",),
    ("relay.routes",),
    ("relay.openapi",),
    ("relay.doors",),
    ("relay.services",),
    ("relay.web",),
    ("relay.serving",),
    ("relay.store",),
    ("relay.bodies", "relay.inputs", "relay.telemetry", "relay.errors", "relay.settings", "relay.node", "relay"),
]


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "relay"):
            return index
    return len(LAYERS) - 1  # relay/__init__.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from relay import keys`` names a module: judge the module, not the package.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def product_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", product_files("relay"), ids=lambda p: str(p.relative_to(ROOT)))
def test_relay_imports_only_downwards(path: Path):
    here = layer_of(module_name(path))
    climbs = [f"{path.relative_to(ROOT)}:{line} imports {target}"
              for line, target in imports(path)
              if target.startswith("relay.") and layer_of(target) < here]
    assert not climbs, "an import climbs a layer:\n" + "\n".join(climbs)


@pytest.mark.parametrize("package", ["wire", "agent"])
def test_wire_and_agent_never_import_the_relay(package: str):
    crossing = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                for path in product_files(package) for line, target in imports(path)
                if target == "relay" or target.startswith("relay.")]
    assert not crossing


def test_wire_imports_neither_side():
    crossing = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                for path in product_files("wire") for line, target in imports(path)
                if target.split(".")[0] in {"agent", "relay", "starlette", "uvicorn", "redis", "websockets", "httpx"}]
    assert not crossing


def test_only_the_demo_imports_the_agent():
    # `relay demo` runs a demo agent in the relay's own process; nothing else of the relay may.
    importers = {str(path.relative_to(ROOT)) for path in product_files("relay") for _, target in imports(path)
                 if target == "agent" or target.startswith("agent.")}
    assert importers == {"relay/server/demo.py"}


def test_the_rule_can_fail():
    # Guard against a vacuous rule: a climbing import is seen as one.
    assert layer_of("relay.doors.openai") < layer_of("relay.store.keys")
    assert layer_of("relay.server.cli") < layer_of("relay.app") < layer_of("relay.bodies.openai")
