"""Pipelines as Ray Jobs: submit the driver to a cluster, watch it, stop it.

The submitted entrypoint is ``python -m branchout driver``: the same driver code as
``branchout run``, started by Ray's job supervisor on the cluster, where ``RAY_ADDRESS``
makes it join that cluster instead of starting an embedded Ray. The resolved spec travels
in the job's ``runtime_env`` (``BRANCHOUT_SPEC``), so nothing needs to be copied by hand;
``submission_id`` is the run id (``<run id>-r<N>`` for the N-th resume).

Authentication: Ray 2.60 clusters require a token on the Jobs API. branchout uses Ray's
own token sources (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)
through Ray's client, never reads the token itself, never prints or stores it, and turns
a 401/403 into one line that says how to provide it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from branchout import __version__

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """The Jobs API refused or could not be reached; the message is one line for the user."""


class JobNotFound(JobsError):
    """The cluster answered and has no such job: a cluster that was restarted (a head lost
    without GCS fault tolerance) or another cluster at the same address."""


def resolve_address(flag: str | None, spec_address: str | None = None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``, else the spec's.

    Raises:
        JobsError: no address anywhere.
    """
    from branchout.orchestrator.config.checks import has_credentials

    for candidate in (flag, *(os.environ.get(k) for k in ADDRESS_ENV), spec_address):
        if candidate and candidate != "auto":
            address = candidate if "://" in candidate else f"http://{candidate}"
            if has_credentials(address):
                raise JobsError("the cluster address embeds credentials, which would be stored in the "
                                "registry; authenticate with RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH instead")
            return address
    raise JobsError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(path)


def enable_token_auth() -> None:
    """Have Ray's client attach the token when one is available (before Ray is imported)."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


class JobsClient:
    """A thin wrapper over ``JobSubmissionClient`` that speaks in one-line errors."""

    def __init__(self, address: str):
        enable_token_auth()
        self.address = address
        from ray.job_submission import JobSubmissionClient

        self._client = self._call(JobSubmissionClient, address)

    def _call(self, fn, *args: Any, **kwargs: Any):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            # No token anywhere here (Ray's own client then refuses before any request), or the
            # server's 401: no token was presented, which is not a wrong token presented.
            if not token_available() or "401" in str(e) or "required" in str(e).lower():
                raise JobsError(
                    f"the Ray cluster at {self.address} requires an authentication token: set "
                    "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
                    "~/.ray/auth_token") from None
            raise JobsError(
                f"the Ray cluster at {self.address} rejected the authentication token: check "
                "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token") from None
        except ConnectionError as e:
            raise JobsError(f"cannot reach the Ray Jobs API at {self.address}: is the head running "
                            f"and its dashboard port reachable? ({_first_line(e)})") from None
        except RuntimeError as e:
            message = _first_line(e)
            if "does not exist" in message or "not found" in message.lower():
                raise JobNotFound(f"the cluster at {self.address} has no such job: {message}") from None
            raise JobsError(f"the Ray Jobs API at {self.address} answered: {message}") from None

    def submit(self, submission_id: str, entrypoint: list[str], env: dict[str, str],
               metadata: dict[str, str], working_dir: str | None = None,
               pip: list[str] | None = None) -> str:
        runtime_env: dict[str, Any] = {"env_vars": env}
        if working_dir:
            from branchout.orchestrator.operate.inputs import (
                NEVER_SHIPPED_DIRS,
                NEVER_SHIPPED_FILES,
            )

            runtime_env["working_dir"] = working_dir
            # Ray keeps .gitignore'd files out already; secrets and VCS folders stay here too
            runtime_env["excludes"] = sorted({*(f"{d}/" for d in NEVER_SHIPPED_DIRS), *NEVER_SHIPPED_FILES})
        if pip:
            runtime_env["pip"] = pip
        return self._call(
            self._client.submit_job, entrypoint=entrypoint_command(entrypoint), submission_id=submission_id,
            runtime_env=runtime_env, metadata=metadata,
            # the driver only orchestrates: it must not hold a GPU (or a CPU) workers need
            entrypoint_num_cpus=0, entrypoint_num_gpus=0)

    def status(self, submission_id: str) -> str:
        return str(self._call(self._client.get_job_status, submission_id).value)

    def info(self, submission_id: str):
        return self._call(self._client.get_job_info, submission_id)

    def logs(self, submission_id: str) -> str:
        return self._call(self._client.get_job_logs, submission_id)

    def follow(self, submission_id: str) -> Iterator[str]:
        """Yield log chunks as the job writes them, until it ends."""
        loop = asyncio.new_event_loop()
        stream = self._client.tail_job_logs(submission_id).__aiter__()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def stop(self, submission_id: str) -> bool:
        return bool(self._call(self._client.stop_job, submission_id))

    def list(self) -> list:
        return self._call(self._client.list_jobs)


def probe_storage(client: JobsClient, storage_uri: str, timeout_s: float = 180) -> None:
    """Refuse, before submitting, storage the cluster cannot use as this machine does.

    This machine writes a token under the storage; a short job on the cluster must find
    it there. A ``file://`` path the nodes do not mount, or a bucket their role cannot
    read, fails here in seconds instead of inside the run.

    Raises:
        JobsError: the probe job failed or did not finish; the message is its last line.
    """
    import time
    import uuid

    from branchout import storage

    nonce = uuid.uuid4().hex[:12]
    marker = storage.join(storage_uri, ".probes", nonce)
    storage.write_text(marker, nonce)
    probe_id = f"branchout-probe-{nonce}"
    try:
        client._call(client._client.submit_job, submission_id=probe_id, entrypoint_num_cpus=0,
                     entrypoint=" ".join(["python", "-m", "branchout", "probe", storage_uri, nonce]))
        deadline = time.time() + timeout_s
        while (status := client.status(probe_id)) not in TERMINAL_JOB_STATES:
            if time.time() > deadline:
                client.stop(probe_id)
                raise JobsError(f"storage: the cluster did not check {storage_uri} within {timeout_s:.0f} s")
            time.sleep(0.5)
        if status != "SUCCEEDED":
            lines = [x.removeprefix("error: ") for x in client.logs(probe_id).splitlines() if x.strip()]
            raise JobsError(f"storage: the cluster cannot use {storage_uri}: {lines[-1] if lines else status}")
    finally:
        storage.remove_file(marker)


def entrypoint_command(argv: list[str]) -> str:
    """``argv`` as the one shell command line Ray's job supervisor runs, every argument quoted:
    a storage path with a space stays one argument, and ``;`` or ``$(...)`` in it runs nothing."""
    import shlex

    return shlex.join(argv)


def driver_entrypoint(*args: str) -> list[str]:
    """The command Ray's job supervisor runs; the cluster's Python must have branchout."""
    return ["python", "-m", "branchout", "driver", *args]


def job_metadata(pipeline: str, run_id: str) -> dict[str, str]:
    from branchout.orchestrator.operate.registry import _user

    return {"pipeline": pipeline, "run_id": run_id, "user": _user(), "branchout": __version__}


def forwarded_env() -> dict[str, str]:
    """Settings the driver needs from this client, never credentials or the Ray token: the
    registry URL goes without its password (see ``orchestrator.operate.secrets``)."""
    from branchout.orchestrator.operate.secrets import without_password

    env = {}
    if os.environ.get("BRANCHOUT_REGISTRY"):
        env["BRANCHOUT_REGISTRY"] = without_password(os.environ["BRANCHOUT_REGISTRY"])
    return env


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
