"""The ``branchout`` command line.

User mistakes (a bad pipeline file, unreadable data, an unreachable cluster, an unknown
run id) print one line per problem to stderr and exit with code 2, before any worker
starts. A run exits 0 only when every stage and every domain job succeeded.

Each command module registers its commands on ``common.app`` when imported; this package
imports them all, and nothing imports this package back.
"""

from branchout.orchestrator.cli import pipeline, runs, schedule  # noqa: F401  (registers the commands)
from branchout.orchestrator.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
