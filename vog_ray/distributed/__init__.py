"""The audit on Ray (DESIGN.md §2–3), stage by stage:

* :mod:`.cluster` — connecting to / starting Ray, Ray Data's context, the CPU layout, the GPU wait;
* :mod:`.scorer` — the scorer actor (checkpoints loaded once; the engine per batch);
* :mod:`.devices` — what each scorer actor ran on (device, GPU, node, rows), for the manifest;
* :mod:`.stage` — stage 1: read → decode → score → the raw table under ``_work/``, resumable
  (:mod:`.resume`); checkpoint-sharded partial moments merged by example (:mod:`.merge`);
* :mod:`.sort` — the sample sort (Ray tasks) that ranks, checks ids and merges by example;
* :mod:`.reduce` — stage 2: class moments → z → ranks, nothing per-example in the driver;
* :mod:`.publish` — the run's tables and manifest, ``_SUCCESS`` last;
* :mod:`.audit` — planning and the orchestration of one audit; :mod:`.incremental` — scheduled
  audits that fold new checkpoints into persisted moments.

The math lives in :mod:`vog_ray.core`; nothing there imports Ray.
"""
