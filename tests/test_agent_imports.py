"""``import agent`` must not drag in the relay's server stack."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_STACK = ("starlette", "uvicorn", "redis")


def test_agent_does_not_import_the_server_stack():
    code = (
        "import json, sys\n"
        "import agent, agent.cli, agent.client, agent.backends\n"
        f"print(json.dumps(sorted(m for m in {SERVER_STACK!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_check_itself_can_fail():
    # Guard against a vacuous test: importing the relay app does pull them in.
    code = (f"import json, sys, relay.server.cli; "
            f"print(json.dumps(sorted(m for m in {SERVER_STACK!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == sorted(SERVER_STACK)
