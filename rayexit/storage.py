"""Where outputs may go: local or shared paths, the URIs Ray's `storage_path` takes, and Ray jobs.

Ray Train and Tune hand `storage_path` to pyarrow (`pyarrow.fs.FileSystem.from_uri`), so
`s3://`, `gs://`, `abfs://`, `hdfs://` and `file://` all work there. rayexit's own folders
(a model directory, a tuning run's `--output`) are written with plain file calls, so they take
a local or shared path or a `file://` URI; a model directory may also go to another URI (it is
written locally, then copied up with pyarrow).

Inside a Ray job (`ray job submit --working-dir . -- python jobs/X.py`), the entrypoint runs in
Ray's copy of the working dir (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>/`),
which Ray deletes once no job uses it; a relative output path would land there. Such a path is
refused rather than redirected: no one place survives a job on every cluster (the head's home
is not shared with the worker nodes or with the laptop that submitted, and on Kubernetes the
head pod's disk goes with the pod), so the user names the shared place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from rayexit.errors import RayexitError

# Set by Ray's job supervisor in the entrypoint's environment (ray/_private/runtime_env/constants.py).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Part of the folder a job's `--working-dir` is unpacked into on the cluster.
WORKING_DIR_MARK = os.path.join("runtime_resources", "working_dir_files")


def is_uri(value: str | os.PathLike) -> bool:
    return "://" in str(value)


def in_ray_job(environ: dict | None = None, cwd: str | None = None) -> bool:
    """True inside the entrypoint of a submitted Ray job (or anything it starts in Ray's working-dir copy)."""
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    return JOB_ENV in environ or WORKING_DIR_MARK in cwd


def local_path(value: str | os.PathLike) -> Path | None:
    """The local path a value names: a plain path or `file://`; None for another URI (s3://, gs://, ...)."""
    text = str(value)
    if not is_uri(text):
        return Path(text).expanduser()
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RayexitError(f"{text}: a file:// URI names a path on this machine: file:///abs/path")
        return Path(parsed.path)
    return None


def check_job_path(value: str | None, flag: str) -> None:
    """Refuse a relative path inside a Ray job: it would land in Ray's garbage-collected working-dir copy."""
    if value is None or is_uri(value) or Path(value).expanduser().is_absolute():
        return
    if in_ray_job():
        raise RayexitError(
            f"{flag} {value}: a relative path inside a Ray job lands in Ray's temporary copy of the "
            f"working dir, which Ray deletes; pass an absolute path on storage the cluster shares "
            f"(e.g. {flag} /mnt/shared/{value.lstrip('./')}) or a URI (e.g. s3://bucket/{value.lstrip('./')})"
        )


def ray_storage_path(value: str | None) -> str | None:
    """`storage_path` for a Ray RunConfig: local paths and `file://` absolute, other URIs as given (Ray opens them)."""
    if value is None:
        return None
    path = local_path(value)
    return str(path.resolve()) if path is not None else str(value)


def open_uri(uri: str):
    """(pyarrow filesystem, path on it) for a storage URI, as Ray resolves its storage_path."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise RayexitError(f"{uri}: not a storage URI pyarrow can open ({exc})") from None


@contextmanager
def local_output(value: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write `value`'s contents into; copied up to `value` afterwards if it is a remote URI.

    Nothing is copied when the body fails, so the remote side never holds a half-written folder
    (a copy that fails midway can still leave part of one: object stores have no rename).
    """
    path = local_path(value)
    if path is not None:
        yield path
        return
    import pyarrow.fs

    filesystem, remote = open_uri(str(value))
    staging = Path(tempfile.mkdtemp(prefix="rayexit-upload-"))
    try:
        yield staging / "out"
        filesystem.create_dir(remote, recursive=True)
        pyarrow.fs.copy_files(str(staging / "out"), remote, destination_filesystem=filesystem)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_job_args(argv: list[str], flags: tuple[str, ...]) -> None:
    """`check_job_path` for each of `flags` found in a command line (`--flag V` or `--flag=V`)."""
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                check_job_path(argv[i + 1], flag)
            elif arg.startswith(flag + "="):
                check_job_path(arg[len(flag) + 1 :], flag)
