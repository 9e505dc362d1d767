"""A plain gloo process group built by hand, for test groups that wrap it to watch every
collective (tests/integration/test_gpu_paths.py checks devices, test_comm_volume.py counts bytes):
``dist.Backend.register_backend`` takes a creator that returns the wrapper around this."""

from __future__ import annotations

import torch


def gloo_group(store, rank: int, size: int, timeout):
    group = torch.distributed.ProcessGroup(store, rank, size)
    group._set_default_backend(torch.distributed.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), torch.distributed.ProcessGroup.BackendType.GLOO,
                            torch.distributed.ProcessGroupGloo(store, rank, size, timeout))
    return group
