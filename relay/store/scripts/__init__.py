"""The relay's Lua scripts, one ``.lua`` file per script or shared function.

A file names the files it builds on in its first lines, one per line::

    -- uses: live_entries

and :func:`script` returns the file with everything it uses in front of it
(each file once, in the order first needed), ready for ``register_script``.
So the Lua of one concern is read in one place, and a function shared by
two scripts (the agent pick, taken alone or with a stream lease) is written
once, with no Python string joined to another across modules.
"""

from __future__ import annotations

import functools
from importlib.resources import files

_USES = "-- uses:"


def _read(name: str) -> str:
    return files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _uses(source: str) -> list[str]:
    found: list[str] = []
    for line in source.splitlines():
        if not line.startswith("--"):
            break  # only the leading comment block declares
        if line.startswith(_USES):
            found.extend(part.strip() for part in line[len(_USES):].split(",") if part.strip())
    return found


@functools.cache
def script(name: str) -> str:
    """The Lua of ``name``.lua preceded by what it uses, transitively, each once."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(current: str) -> None:
        if current in order:
            return
        if current in visiting:
            raise ValueError(f"Lua scripts use each other in a circle at {current!r}")
        visiting.add(current)
        for used in _uses(_read(current)):
            visit(used)
        order.append(current)

    visit(name)
    return "\n".join(_read(part) for part in order)
