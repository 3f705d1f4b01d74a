"""Ray job entrypoint for one audit (and its report).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/audit.py CONFIG.yaml [--set k=v]

Connects to the cluster the job runs in (``ray job submit`` sets ``RAY_ADDRESS`` for the job's
driver), runs the audit and the report, and exits non-zero with a clear message on failure.
Same as ``vog-ray audit CONFIG.yaml``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vog_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print("usage: python jobs/audit.py CONFIG.yaml [--set key=value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["audit", *args]))
