"""The pipeline vocabulary every layer shares: the spec models and progress reporting.

Imported by ``cluster/``, ``stages/`` and ``orchestrator/`` alike; imports none of them."""
