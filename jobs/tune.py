"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/tune.py --model ... --output DIR`.

Takes the same flags as `rayexit tune` and runs on the cluster the job was submitted to, for
both tasks (`--task token` tunes a tagger: stage 1, self-sampling and its SENTEE/TOKEE exit).
`--output` (and `--resume`) must be an absolute path on storage every node sees, and
`--storage-path` that or a URI: the job runs in Ray's temporary copy of the working dir, and a
relative path would land there (and `serve.yaml` would point there) until Ray deletes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `--working-dir .` ships the project but does not install it; import it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayexit.cli import main  # noqa: E402

PATH_FLAGS = ("--output", "--resume", "--storage-path")


def run(argv: list[str]) -> int:
    from rayexit.errors import RayexitError
    from rayexit.storage import check_job_args

    try:
        check_job_args(argv, PATH_FLAGS)
    except RayexitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return main(["tune", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
