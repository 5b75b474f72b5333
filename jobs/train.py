"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --config ... --output ...`.

Takes the options of `rayexit train`; under `ray job submit` the driver runs on the cluster's
head with RAY_ADDRESS set, so training goes to that cluster's workers. Without --num-workers,
one Ray Train worker is used (a job should not train inside its driver process).

`--output` and `--storage-path` must be absolute paths on storage the cluster shares, or URIs
(s3://, gs://, file://...): the job runs in Ray's temporary copy of the working dir, and a
relative path would land there and be deleted with it (refused, naming what to pass).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `--working-dir .` ships the project but does not install it; import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayexit.cli import main  # noqa: E402

PATH_FLAGS = ("--output", "--storage-path")


def job_args(argv: list[str]) -> list[str]:
    if not any(arg == "--num-workers" or arg.startswith("--num-workers=") for arg in argv):
        argv = [*argv, "--num-workers", "1"]
    return ["train", *argv]


def run(argv: list[str]) -> int:
    from rayexit.errors import RayexitError
    from rayexit.storage import check_job_args

    try:
        check_job_args(argv, PATH_FLAGS)
    except RayexitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return main(job_args(argv))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
