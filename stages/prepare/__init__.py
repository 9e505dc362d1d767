"""Data preparation on the workers: tokenizer training, document reading and the held-out
split, decontamination, tokenizing and packing into blocks (``data.prepare``)."""
