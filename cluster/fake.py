"""A fake autoscaling GPU cluster on one machine, for dry runs, tests and benchmarks.

Ray's ``fake_multinode`` provider starts and stops real raylets on this machine that
declare whatever resources their node type lists (here: 1 "GPU" each). With
``BRANCHOUT_SIMULATE_GPUS=1`` (set in ``env()``) branchout treats GPUs as scheduling
tokens and trains on the CPU, so a whole pipeline, autoscaling included, runs on a laptop.

``ray start --head`` with this provider runs ``ray stop --force`` first (Ray's doing): no other Ray
may run at the same time. ``stop()`` ends only this cluster's processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gpu_nodes: int, idle_timeout_minutes: float, gcs_address: str) -> dict:
    return {
        "cluster_name": "branchout-fake",
        "max_workers": gpu_nodes,
        # gcs_address: without it fake nodes join <this host's IP>:6379, not our head
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "gcs_address": gcs_address,
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
        self.config.write_text(yaml.safe_dump(autoscaling_config(gpu_nodes, idle_timeout_minutes, self.address)))
        self.token = uuid.uuid4().hex
        self.samples_file = workdir / "gpu_nodes.tsv"  # "time<TAB>alive GPU nodes" every 0.5 s
        self._watcher: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """For processes that use the cluster: its address, its token, fake GPUs."""
        return {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_ADDRESS": self.address, "BRANCHOUT_SIMULATE_GPUS": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,  # token auth stays on
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self) -> FakeAutoscalingCluster:
        env = self.env()
        env.pop("RAY_ADDRESS")
        subprocess.run(["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        f"--autoscaling-config={self.config}", "--num-cpus=2", "--num-gpus=0",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        self._watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, self.address, str(self.samples_file)],
                                         env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    @property
    def samples(self) -> list[tuple[float, int]]:
        """(time, alive GPU nodes) as sampled so far."""
        if not self.samples_file.exists():
            return []
        rows = [line.split("\t") for line in self.samples_file.read_text().splitlines() if line.count("\t") == 1]
        return [(float(t), int(n)) for t, n in rows]

    def gpu_nodes(self) -> int:
        samples = self.samples
        return samples[-1][1] if samples else 0

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.terminate()
            self._watcher.wait(30)
        stop_local_cluster(self.port)


# Samples the cluster from its own process (a Ray client needs the cluster's token).
_WATCHER = r"""
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, namespace="watcher")
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        gpus = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0)
        out.write(f"{time.time()}\t{gpus}\n")
        time.sleep(0.5)
"""


def stop_local_cluster(gcs_port: int) -> None:
    """End the processes of the local cluster whose GCS listens on ``gcs_port``, and only
    them. `ray stop --force` ends every Ray on the machine (another test's, a user's) and
    took 8-27 s; killing the cluster's own daemons and their descendants takes ~1-2 s."""
    import psutil

    def own(args: list[str]) -> bool:
        # whole arguments only: another raylet's --python_worker_command holds a port as a substring
        return any(a == f"--gcs_server_port={gcs_port}" or (a.startswith("--") and " " not in a
                                                             and a.endswith(f":{gcs_port}")) for a in args)

    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and own(p.info["cmdline"] or [])]
    procs = set(roots)
    for root in roots:  # workers, agents, dashboard modules, drivers of submitted jobs
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update(root.children(recursive=True))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(procs), timeout=30)
    # what `ray stop` also does: a record of this dead cluster as "the current one" would
    # cost every later Ray Train run on the machine 12 s (cluster.connect.forget_dead_cluster_address)
    from ray._common.utils import get_ray_address_file, reset_ray_address

    with contextlib.suppress(OSError):
        if Path(get_ray_address_file(None)).read_text().strip().endswith(f":{gcs_port}"):
            reset_ray_address()
