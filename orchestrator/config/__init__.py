"""Reading a pipeline file: loading, validation, data preflight, the plan, the JSON Schema."""
