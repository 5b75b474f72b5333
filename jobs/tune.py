"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/tune.py --model ... --output DIR`.

Takes the same flags as `rayexit tune` and runs on the cluster the job was submitted to.
"""

from __future__ import annotations

import sys

from rayexit.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
