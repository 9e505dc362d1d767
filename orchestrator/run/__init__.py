"""Running a pipeline: the driver, the fan-out, run state, caching, the report."""
