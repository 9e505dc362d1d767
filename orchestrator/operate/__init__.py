"""Operating runs: the registry, Ray jobs, schedules, shipping inputs, secrets."""
