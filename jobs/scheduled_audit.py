"""Ray job entrypoint for scheduled, incremental audits of a training run that keeps writing checkpoints.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/scheduled_audit.py CONFIG.yaml

Lists the checkpoint prefix, folds only the new checkpoints into the persisted per-example
moments, publishes a new ranked run with its report, and exits 0. With nothing new it prints
"up to date" and writes nothing. Run it from cron, a Kubernetes CronJob or a KubeRay RayCronJob
(see cluster/). Same as ``vog-ray audit --incremental CONFIG.yaml``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vog_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print("usage: python jobs/scheduled_audit.py CONFIG.yaml [--set key=value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["audit", "--incremental", *args]))
