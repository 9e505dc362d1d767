"""Ray's "current cluster" record: a dead cluster's is forgotten, a live one's kept."""

from __future__ import annotations

import os
import socket

from branchout.cluster.connect import forget_dead_cluster_address
from branchout.cluster.fake import free_port


def test_a_dead_clusters_record_is_removed(tmp_path):
    record = tmp_path / "ray_current_cluster"
    record.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    forget_dead_cluster_address(str(record))
    assert not record.exists()


def test_a_live_clusters_record_stays(tmp_path):
    record = tmp_path / "ray_current_cluster"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        record.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        forget_dead_cluster_address(str(record))
    assert record.read_text().startswith("127.0.0.1:")


def test_no_record_and_a_garbled_one(tmp_path):
    forget_dead_cluster_address(str(tmp_path / "absent"))  # nothing to do, no error
    garbled = tmp_path / "ray_current_cluster"
    garbled.write_text("not an address")
    forget_dead_cluster_address(str(garbled))
    assert not garbled.exists()


def test_an_embedded_instance_runs_without_ray_trains_preemption_watcher(monkeypatch):
    """One node, this machine: nothing drains it and there is nowhere to move to. The switch is
    the variable Ray Train hands from the driver to its controller (checked against the
    installed Ray, so an upgrade that stops handing it on fails here)."""
    from ray.train.v2._internal.constants import (
        ENABLE_PREEMPTION_WATCHER_ENV_VAR,
        ENV_VARS_TO_PROPAGATE,
    )

    from branchout.cluster.connect import PREEMPTION_WATCHER, _without_preemption_watcher

    assert PREEMPTION_WATCHER == ENABLE_PREEMPTION_WATCHER_ENV_VAR and PREEMPTION_WATCHER in ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    assert _without_preemption_watcher() == PREEMPTION_WATCHER
    assert os.environ[PREEMPTION_WATCHER] == "0"
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")  # the user's choice stays, and is not unset after
    assert _without_preemption_watcher() is None and os.environ[PREEMPTION_WATCHER] == "1"
