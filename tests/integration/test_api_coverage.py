"""docs/api-coverage.md is generated from the action registry and must stay in step with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_all_24_actions_are_registered() -> None:
    from opensmc.api.actions import ACTIONS

    assert len(ACTIONS) == 24


def test_coverage_doc_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_api_coverage.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_cli_parameter_table_is_the_registry() -> None:
    """`opensmc call` checks command lines against a generated copy; it must say what the registry says."""
    from opensmc.api.actions import ACTIONS
    from opensmc.cli.action_params import PARAMS

    assert PARAMS == {name: action.params for name, action in ACTIONS.items()}
