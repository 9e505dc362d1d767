"""The driver holds no weights: a fan-out from a ~200M-parameter base through ``PoolSet``.

The driver often runs on a small head node (always, when submitted as a Ray job). It
used to load the whole base (fp32) to ``ray.put`` it for the warm pool: 27 GB for a 7B
model. Now a loader task on a worker puts it in the object store; the driver only passes
the reference on. This measures the driver process itself (USS: its private pages; RSS:
also the object-store pages it maps) while real LoRA jobs train on that base.
"""

from __future__ import annotations

import dataclasses
import threading

import psutil
import pytest

from conftest import job_for, job_parts, local_ray

pytestmark = pytest.mark.slow

# ~205M parameters: 16 × (4·1024² attention + 3·1024·2816 MLP) + embeddings; 0.82 GB in fp32
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
       "num_key_value_heads": 16, "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("test-driver-mem"):
        yield


class PeakMemory:
    """The highest USS and RSS of this process, sampled every 0.1 s while in the ``with``."""

    def __init__(self):
        self.proc = psutil.Process()
        self.uss = self.rss = 0
        self._stop = threading.Event()

    def sample(self) -> None:
        info = self.proc.memory_full_info()
        self.uss, self.rss = max(self.uss, info.uss), max(self.rss, info.rss)

    def __enter__(self):
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def test_driver_memory_stays_flat_through_a_fanout(ray_local, corpus_dir, tmp_path):
    import gc

    import ray

    from branchout.orchestrator.run.pool import PoolSet
    from branchout.stages.training.model import shared_base_weights

    # nested, so that Ray ships the function itself (this test module is not on workers' path)
    def _make_base(root: str, config: dict) -> int:
        """Build and publish the big base in a worker: the driver must not touch it either."""
        from branchout.stages.prepare.tokenizer import load_tokenizer, special_token_ids
        from branchout.stages.training.model import build_config, build_model, export_model

        tok = load_tokenizer(f"{root}/tokenizer")
        model = build_model(build_config("llama", config, len(tok), special_token_ids(tok)), seed=0)
        export_model(model, tok, f"{root}/big-base")
        return sum(p.numel() for p in model.parameters())

    parts = job_parts(tmp_path, corpus_dir)
    params = ray.get(ray.remote(num_cpus=1)(_make_base).remote(str(tmp_path), BIG))
    base_bytes = 4 * params
    assert 190e6 < params < 220e6, params
    jobs = [dataclasses.replace(job_for(parts, f"lora{i}", "lora", steps=2, micro_batch_size=2, global_batch_size=2),
                                model_overrides=BIG, base_model_uri=str(tmp_path / "big-base")) for i in range(3)]
    pools = PoolSet(str(tmp_path / "big-base"), max_concurrent=None, fixed_cluster=True)
    gc.collect()
    before = psutil.Process().memory_full_info()
    with PeakMemory() as peak:
        futures = [pools.submit(job, {"CPU": 1.0}, len(jobs) - i) for i, job in enumerate(jobs)]
        results = [f.result(timeout=600) for f in futures]
        pools.shutdown()
    assert [r["steps"] for r in results] == [2, 2, 2]
    uss, rss = peak.uss - before.uss, peak.rss - before.rss
    print(f"driver growth through the fan-out: USS {uss / 2**20:.0f} MiB, RSS {rss / 2**20:.0f} MiB; "
          f"base {base_bytes / 2**20:.0f} MiB")
    assert uss < base_bytes / 4 and rss < base_bytes / 4, (uss, rss, base_bytes)

    # The same measurement sees the base when the driver loads and puts it, as PoolSet once did
    with PeakMemory() as held:
        ref = ray.put(shared_base_weights(str(tmp_path / "big-base")))
    del ref
    print(f"driver growth when it loads and puts the base itself: RSS {(held.rss - before.rss) / 2**20:.0f} MiB")
    assert held.rss - before.rss > 0.9 * base_bytes, (held.rss - before.rss, base_bytes)
