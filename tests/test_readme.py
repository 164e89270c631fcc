"""README.md is the contract with a new user: its install and test commands are the ones CI runs."""
from __future__ import annotations

from conftest import REPO


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (REPO / "README.md").read_text()
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                   if line.strip().startswith(("pip install", "python -m pytest"))]
    assert len(ci_commands) == 2
    for command in ci_commands:
        assert f"\n{command}\n" in readme, f"README.md does not show the CI command {command!r}"
