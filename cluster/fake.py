"""A fake autoscaling GPU cluster on one machine, for dry runs, tests and benchmarks.

Ray's ``fake_multinode`` provider starts and stops real raylets on this machine that
declare whatever resources their node type lists (here: 1 "GPU" each). With
``BRANCHOUT_SIMULATE_GPUS=1`` (set in ``env()``) branchout treats GPUs as scheduling
tokens and trains on the CPU, so a whole pipeline, autoscaling included, runs on a laptop.

``ray start --head`` runs ``ray stop --force`` first: no other Ray may run at the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gpu_nodes: int, idle_timeout_minutes: float) -> dict:
    return {
        "cluster_name": "branchout-fake",
        "max_workers": gpu_nodes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "nobody"},
        "upscaling_speed": 10,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class FakeAutoscalingCluster:
    def __init__(self, workdir: Path, gpu_nodes: int = 4, idle_timeout_minutes: float = 0.1):
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "autoscaler.yaml"
        self.config.write_text(yaml.safe_dump(autoscaling_config(gpu_nodes, idle_timeout_minutes)))
        self.samples: list[tuple[float, int]] = []  # (time, alive GPU nodes)
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_ADDRESS": self.address, "BRANCHOUT_SIMULATE_GPUS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            env.pop(key, None)
        return env

    def start(self) -> FakeAutoscalingCluster:
        env = self.env()
        env.pop("RAY_ADDRESS")
        subprocess.run(["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        f"--autoscaling-config={self.config}", "--num-cpus=2", "--num-gpus=0",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        import ray

        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False, namespace="watcher")
        while not self._stop.is_set():
            gpu_nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0)
            self.samples.append((time.time(), gpu_nodes))
            time.sleep(0.5)
        ray.shutdown()

    def gpu_nodes(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self._stop.set()
        time.sleep(1)
        subprocess.run(["ray", "stop", "--force"], env=self.env(), capture_output=True, timeout=180)
