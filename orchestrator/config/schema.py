"""The pipeline file's JSON Schema, generated from the pydantic models (``branchout schema``).

Editors that speak the YAML language server validate and complete a pipeline file as it
is typed when its first lines say where the schema is::

    # yaml-language-server: $schema=../docs/pipeline.schema.json

``docs/pipeline.schema.json`` is this module's output; a test keeps the two equal and
validates every shipped example against it. The schema sees one field at a time:
cross-field rules (batch divisibility, ZeRO options vs. device) stay ``validate``'s.

    python -m branchout.orchestrator.config.schema > docs/pipeline.schema.json
"""

from __future__ import annotations

import json

from branchout.core.spec import PipelineSpec


def pipeline_schema() -> dict:
    schema = PipelineSpec.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render() -> str:
    return json.dumps(pipeline_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
