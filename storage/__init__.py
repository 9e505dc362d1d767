"""Run storage addressed by URI: a local directory or any pyarrow filesystem (s3://, gs://).

Workers compute into a local scratch directory and then ``upload_dir`` the result;
readers ``download_dir`` (a no-op for local storage, which is read in place). Keeping
every storage access behind these few functions is what lets the same pipeline file run
embedded on a laptop and on a multi-node cluster with object storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from branchout.storage.retry import retrying


def local_cache_dir(*parts: str) -> str:
    """This machine's cache of derived files (data fingerprints, object-store copies):
    ``$BRANCHOUT_CACHE_DIR`` or ``~/.cache/branchout``. Only a cache: losing it costs time."""
    root = os.environ.get("BRANCHOUT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "branchout")
    return os.path.join(root, *parts)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it."""
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    if is_local(uri):
        return os.path.exists(local_path(uri))
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    if is_local(uri):
        return Path(local_path(uri)).read_bytes()
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _write_bytes(uri: str, data: bytes, durable: bool = True) -> None:
    """Write a whole file; locally via a temp file + rename so readers never see half of it."""
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:  # object stores publish a whole object at once
        f.write(data)


def write_bytes(uri: str, data: bytes, durable: bool = True) -> None:
    """Write a whole file; locally via a temp file + rename so readers never see half of it
    (retried on transient errors: ``storage.retry``)."""
    retrying(f"write {uri}", _write_bytes, uri, data, durable)


def write_text(uri: str, text: str, durable: bool = True) -> None:
    write_bytes(uri, text.encode("utf-8"), durable)


def remove_file(uri: str) -> None:
    """Delete one file; nothing when it is not there."""
    retrying(f"delete {uri}", _remove_file, uri)


def remove_dir(uri: str) -> None:
    retrying(f"delete {uri}", _remove_dir, uri)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (created if needed)."""
    retrying(f"upload to {uri}", _upload_dir, local_dir, uri)


def upload_file(local_file: str, uri: str) -> None:
    """Copy one local file to ``uri`` (its folder created if needed), streamed."""
    retrying(f"upload to {uri}", _upload_file, local_file, uri)


def copy_dir(src_uri: str, dst_uri: str, last: str | None = None) -> None:
    """Copy a tree within one store (server-side on object stores); ``last`` (a file name
    at the top) is copied after everything else, e.g. a manifest that marks it complete."""
    retrying(f"copy to {dst_uri}", _copy_dir, src_uri, dst_uri, last)


def listdir(uri: str) -> list[str]:
    """Names directly under ``uri``; empty when it does not exist."""
    if is_local(uri):
        path = local_path(uri)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(info.base_name for info in fs.get_file_info(selector))


def _remove_file(uri: str) -> None:
    """Delete one file; nothing when it is not there."""
    if is_local(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(local_path(uri))
        return
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def _remove_dir(uri: str) -> None:
    if is_local(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (created if needed)."""
    if is_local(uri):
        dst = local_path(uri)
        if os.path.abspath(dst) != os.path.abspath(local_dir):
            shutil.copytree(local_dir, dst, dirs_exist_ok=True)
        return
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _upload_file(local_file: str, uri: str) -> None:
    """Copy one local file to ``uri`` (its folder created if needed), streamed."""
    if is_local(uri):
        dst = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.copyfile(local_file, dst)
        return
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(local_file, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def sizes(uri: str) -> dict[str, int]:
    """Every file under ``uri`` by its path relative to ``uri``, with its size in bytes."""
    if is_local(uri):
        root = local_path(uri)
        return {os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
                for d, _, names in os.walk(root) for n in names}
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path.rstrip("/")) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _copy_dir(src_uri: str, dst_uri: str, last: str | None = None) -> None:
    """Copy a tree within one store (server-side on object stores); ``last`` (a file name
    at the top) is copied after everything else, e.g. a manifest that marks it complete."""
    fs, src = filesystem(src_uri)
    _, dst = filesystem(dst_uri)
    fs.create_dir(dst, recursive=True)
    names = sorted(sizes(src_uri), key=lambda n: n == last)
    for name in names:
        target = f"{dst.rstrip('/')}/{name}"
        if "/" in name:
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(f"{src.rstrip('/')}/{name}", target)


def download_file(uri: str, local_file: str) -> None:
    """Copy one file to a local path, streamed (never whole in memory).

    Raises:
        FileNotFoundError: no such file.
    """
    if is_local(uri):
        shutil.copyfile(local_path(uri), local_file)
        return
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    pafs.copy_files(path, local_file, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def download_dir(uri: str, local_dir: str | None = None) -> str:
    """A local directory holding ``uri``'s files: the directory itself when local."""
    if is_local(uri):
        return local_path(uri)
    fs, path = filesystem(uri)
    local_dir = local_dir or tempfile.mkdtemp(prefix="branchout-")
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


class StorageError(RuntimeError):
    """Run storage cannot be used (missing bucket, unwritable directory, shared-ness)."""


def check_reachable(uri: str) -> None:
    """Fail early, with one line, when ``uri`` cannot hold runs.

    Raises:
        StorageError: the directory cannot be created, or the bucket does not exist or
            refuses access.
    """
    if is_local(uri):
        path = local_path(uri)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StorageError(f"storage: cannot create {path}: {e.strerror}") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable")
        return
    try:
        fs, path = filesystem(uri)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(f"storage: cannot reach {uri}: {str(e).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"storage: bucket {bucket!r} does not exist ({uri})")


def sha256_file(path: str) -> str:
    """SHA-256 of a local file, read in 1 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
