"""GPU names as branchout spells them (``H100-80GB``) and as Ray's accelerator-type resources do."""

from __future__ import annotations

# The accelerator type Ray detects on such a node (``accelerator_type:<type>`` resource,
# from the GPU's name: "NVIDIA H100 80GB HBM3" → "H100"). Ray does not tell the memory
# variants of one chip apart (A100 40 and 80 GB both report "A100").
RAY_ACCELERATOR_TYPES: dict[str, str] = {
    "T4-16GB": "T4", "V100-16GB": "V100", "V100-32GB": "V100", "A10G-24GB": "A10G", "L4-24GB": "L4",
    "RTX4090-24GB": "GeForce-RTX-4090", "A100-40GB": "A100", "L40S-48GB": "L40S", "A100-80GB": "A100",
    "H100-80GB": "H100", "H200-141GB": "H200", "B200-192GB": "B200", "MI300X-192GB": "AMD-Instinct-MI300X-OAM",
}


def ray_accelerator_type(name: str) -> str:
    """Ray's accelerator type for a GPU name of ``GPUS`` (``H100-80GB`` → ``H100``); any other
    name is taken to be Ray's own spelling already."""
    return RAY_ACCELERATOR_TYPES.get(name, name)
