"""Evaluation on the workers: held-out perplexity and generated answers per domain."""
