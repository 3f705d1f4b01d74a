"""``vog-ray``: the command line.

::

    vog-ray audit CONFIG.yaml [--set compute.batch_size=128] [--address HOST:PORT] [--no-report] [--incremental]
    vog-ray report RUN_URL
    vog-ray compare RUN_A RUN_B [--out compare.json]
    vog-ray runs OUTPUT_URL
    vog-ray verify RUN_URL [--no-source]
    vog-ray validate CONFIG.yaml [--set …] [--check-io]
    vog-ray explore RUN_OR_OUTPUT_URL [--port 8765] [--host 127.0.0.1]
    vog-ray export RUN [--where SQL] [--flagged] [--split S] [--top N] --to csv|parquet|jsonl|labelstudio [--out FILE]

Every failure is one ``error:`` line on stderr (``--debug``: with the traceback); exit codes: 0 ok,
1 a failure, 2 an invalid config or input (the message names the file and key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from typing import Sequence

from .config import ConfigError, DataError, load_config
from .distributed.cluster import UnsupportedAddress, check_address
from .storage import StorageOptions, redact_url

__all__ = ["main", "describe_error", "user_error"]


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=getattr(args, "endpoint_url", None),
                          anonymous=getattr(args, "anonymous", False))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vog-ray", description="Rank every example of a dataset by Variance of Gradients, on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("audit", help="run an audit described by a YAML config")
    a.add_argument("config")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set compute.batch_size=128 (repeatable)")
    a.add_argument("--address", default=None,
                   help="the Ray cluster's GCS address HOST:PORT, or 'local' (default: RAY_ADDRESS, else the cluster "
                        "`ray start` runs on this machine, else a local Ray); ray:// is refused")
    a.add_argument("--no-report", action="store_true", help="skip the report")
    a.add_argument("--incremental", action="store_true",
                   help="fold only new checkpoints into the persisted moments (scheduled audits)")

    v = sub.add_parser("validate", help="validate a config and print it with defaults filled in")
    v.add_argument("config")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--check-io", action="store_true",
                   help="also list the checkpoints and input files and check output.url is writable (no Ray)")

    for name, hlp in (("report", "write report.json / report.html for a published run"),):
        r = sub.add_parser(name, help=hlp)
        r.add_argument("run", help="a run URL, or an output URL (its latest run)")
        r.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
        r.add_argument("--anonymous", action="store_true")

    c = sub.add_parser("compare", help="rank stability between two runs")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None, help="where to write compare.json (default: print only)")
    c.add_argument("--endpoint-url", default=None)
    c.add_argument("--anonymous", action="store_true")

    ls = sub.add_parser("runs", help="list the published runs under an output URL")
    ls.add_argument("output")
    ls.add_argument("--endpoint-url", default=None)
    ls.add_argument("--anonymous", action="store_true")
    _explore_parsers(sub)

    ve = sub.add_parser("verify", help="check a run against its invariants (and its source data)")
    ve.add_argument("run", help="a run URL, or an output URL (its latest run)")
    ve.add_argument("--no-source", action="store_true",
                    help="do not read the source data again (skips the carried-column and id checks)")
    ve.add_argument("--endpoint-url", default=None)
    ve.add_argument("--anonymous", action="store_true")
    return p


def _explore_parsers(sub) -> None:
    """``vog-ray explore`` and ``vog-ray export``."""
    e = sub.add_parser("explore", help="browse, filter and inspect a run's ranked examples in a browser")
    e.add_argument("run", help="a run URL, or an output URL (its latest run)")
    e.add_argument("--port", type=int, default=8765)
    e.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    e.add_argument("--device", default="cpu", help="where heat maps are computed (cpu, cuda, auto)")
    x = sub.add_parser("export", help="write a selection of a run's ranked examples (CSV, Parquet, JSON lines, "
                                      "Label Studio tasks)")
    x.add_argument("run", help="a run URL, or an output URL (its latest run)")
    x.add_argument("--where", default=None, metavar="SQL",
                   help="a condition over the score table's columns, e.g. \"label <> pred AND percentile >= 99\"")
    x.add_argument("--flagged", action="store_true", help="only the rows the run's flags section flagged")
    x.add_argument("--split", default=None)
    x.add_argument("--top", type=int, default=None, metavar="N", help="the N highest scores (z) of the selection")
    x.add_argument("--to", dest="fmt", required=True, choices=["csv", "parquet", "jsonl", "labelstudio"])
    x.add_argument("--out", default="-", help="output file (default: standard output; parquet needs a file)")
    for q in (e, x):
        q.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
        q.add_argument("--anonymous", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _redact_log_records()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one error line
        if args.debug:
            traceback.print_exc()
        code, msg = describe_error(e)
        print(f"error: {_redact(msg)}", file=sys.stderr)
        return code


# names of environment variables whose values are credentials (AWS_SECRET_ACCESS_KEY, *_TOKEN …)
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE_KEY|SESSION_KEY)", re.I)


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def _redact(text: str) -> str:
    """Mask URL userinfo and the values of secret environment variables in a text."""
    text = redact_url(text)
    for v in _secret_values():
        text = text.replace(v, "***")
    return text


def _redact_log_records() -> None:
    """Every log record of this process (ours, Ray's, fsspec's, botocore's — at any level, e.g.
    with ``-v``) is created with its message redacted: third-party debug logs print URLs with
    their userinfo and request headers."""
    if getattr(logging.getLogRecordFactory(), "_vog_redacting", False):
        return
    old = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        rec = old(*args, **kwargs)
        try:
            msg = rec.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's to report
            return rec
        red = _redact(msg)
        if red != msg:
            rec.msg, rec.args = red, ()
        return rec

    factory._vog_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _is_ray(e: BaseException) -> bool:
    return type(e).__module__.split(".", 1)[0] == "ray"


def user_error(e: BaseException) -> BaseException:
    """The error a user can act on: Ray's wrappers (a task's or actor's error, Ray Data's
    ``UserCodeException``) are unwrapped down to the exception raised in the task; an error that
    vog-ray raised from another (``CheckpointError`` from torch's) is kept, as it names the file."""
    seen: set[int] = set()
    while _is_ray(e) and id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None or not str(nxt):  # Ray Data's empty markers (``from SystemException()``)
            break
        e = nxt
    return e


_PLAIN = (ValueError, RuntimeError, OSError, KeyError, TypeError)  # their message says it all


def describe_error(e: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` of an error: 2 for an invalid config or input (the message names the
    file and key), 1 for any other failure; the message without Ray's wrapping or tracebacks."""
    from .models.checkpoints import CheckpointError

    root = user_error(e)
    if isinstance(root, DataError):  # Ray Data appends retry hints on the lines after the error itself
        return 2, str(root).strip().splitlines()[0]
    if isinstance(root, KeyError) and len(root.args) == 1 and isinstance(root.args[0], str):
        msg = root.args[0]  # str(KeyError) quotes its message
    else:
        msg = str(root)
    if _is_ray(root) and "\n" in msg:
        # an error raised in a Ray worker (an actor's __init__ …) arrives as text with the worker's
        # traceback: its last "SomeError: message" line is the user's error
        raised = [m.group(1) for m in _RAISED.finditer(msg.split("\n", 1)[-1])]
        if raised:
            return 1, raised[-1]
    msg = msg.split("\nTraceback (most recent call last)", 1)[0].strip() + _cwd_gone(root)
    if not msg or not (type(root).__module__.startswith("vog_ray") or type(root) in _PLAIN
                       or isinstance(root, (FileNotFoundError, PermissionError))):
        msg = f"{type(root).__name__}: {msg}" if msg else type(root).__name__
    return (2 if isinstance(root, (ConfigError, CheckpointError, UnsupportedAddress)) else 1), msg


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Refused|Held): (.+)$", re.M)



def _cwd_gone(e: BaseException) -> str:
    """A file error that names no file may come from this process's working directory having been
    deleted under it (relative paths are resolved against it): say so."""
    if not isinstance(e, FileNotFoundError) or e.filename is not None:
        return ""
    try:
        os.getcwd()
    except FileNotFoundError:
        return " (this process's working directory was deleted while it ran)"
    return ""




def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "validate":
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(cfg.to_dict(), indent=2))
        if args.check_io:
            from .checkio import check_io

            print("\n".join(check_io(cfg)))
        return 0
    if args.cmd == "audit":
        check_address(args.address)  # refused before anything is read
        cfg = load_config(args.config, args.overrides)
        report = False if args.no_report else None  # None: as the config's report.enabled says
        if args.incremental:
            from .distributed.incremental import (IncrementalConfigError, TooFewCheckpoints, check_incremental_config,
                                                  run_incremental)

            try:
                check_incremental_config(cfg)
            except IncrementalConfigError as e:
                raise ConfigError(f"invalid config {args.config} for an incremental audit:\n  {e.key}: {e}") from None
            try:
                res = run_incremental(cfg, address=args.address, report=report)
            except TooFewCheckpoints as e:
                print(f"waiting: {e}")
                return 0
            if res is None:
                print("up to date: no new checkpoint")
                return 0
        else:
            from .distributed.audit import run_audit

            res = run_audit(cfg, address=args.address, report=report)
        print(res.summary())
        if cfg.report.enabled and not args.no_report:
            print(f"report: {res.run_url}/report.html")
        return 0
    if args.cmd == "report":
        from .report import build_report, findings_lines

        out = build_report(args.run, storage=_storage(args))
        print("\n".join(findings_lines(out)))
        where = out.get("html_url") if isinstance(out, dict) else None
        print(f"report written{': ' + where if where else ''}")
        return 0
    if args.cmd == "compare":
        from .report import compare_runs

        res = compare_runs(args.run_a, args.run_b, storage=_storage(args), out=args.out)
        print(res.get("text", json.dumps(res, indent=2)) if isinstance(res, dict) else res)
        return 0
    if args.cmd == "runs":
        return _runs(args)
    if args.cmd == "verify":
        return _verify(args)
    if args.cmd == "explore":
        return _explore(args)
    if args.cmd == "export":
        return _export(args)
    raise AssertionError(args.cmd)


def _runs(args: argparse.Namespace) -> int:
    """The published runs, one id a line; a place with none says so on stderr (exit 0), a place
    that does not exist is an error (exit 1)."""
    from .runs import list_runs
    from .storage import resolve

    fs, path = resolve(args.output, _storage(args))
    if not fs.exists(path):
        raise FileNotFoundError(f"no output at {args.output!r} (nothing was ever written there)")
    ids = list_runs(args.output, _storage(args))
    for rid in ids:
        print(rid)
    if not ids:
        print(f"no published run under {args.output!r}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Every invariant of a published run: exit 0 when all hold, 1 (listing them) when one breaks."""
    from .runs import open_run
    from .verify import verify_run

    run = open_run(args.run, _storage(args))
    v = verify_run(run.url, _storage(args), source=not args.no_source)
    for p in v.problems:
        print(f"broken: {p}")
    print(f"run {run.url}: {v.rows} rows; checked: {', '.join(v.checked)}"
          + ("" if v.source == "read" else f"; source {v.source}"))
    if v.ok:
        print("ok: every invariant holds")
        return 0
    print(f"error: {v.message(limit=3)}", file=sys.stderr)
    return 1


def _explore(args: argparse.Namespace) -> int:
    from .explore.server import serve

    serve(args.run, host=args.host, port=args.port, storage=_storage(args), device=args.device)
    return 0


def _export(args: argparse.Namespace) -> int:
    """Rows of a run to a file or stdout; a bad ``--where``/``--split``/``--top`` exits 2."""
    import duckdb

    from .explore.export import export_table, labeling_config, write_export
    from .explore.queries import Filters, RunTables
    from .runs import open_run

    if args.fmt == "parquet" and args.out == "-":
        raise ConfigError("export --to parquet: give the output file with --out")
    if args.top is not None and args.top < 1:
        raise ConfigError(f"export --top: {args.top} is not a positive number of rows")
    tables = RunTables(open_run(args.run, _storage(args)))
    try:
        if args.split is not None and args.split not in tables.splits:
            raise ConfigError(f"export --split: {args.split!r} is not a split of the run ({tables.splits})")
        if args.flagged and not tables.has_flagged:
            raise ConfigError("export --flagged: the run has no flagged column (its config has no flags section)")
        f = Filters(split=args.split, flagged=True if args.flagged else None)
        try:
            t = export_table(tables, f, where_sql=args.where, top=args.top)
        except duckdb.Error as e:  # DuckDB's parser and binder errors name the problem
            if args.where:
                raise ConfigError(f"export --where {args.where!r}: {str(e).splitlines()[0]}") from None
            raise
        storage = tables.run.storage
        if args.out == "-":
            write_export(tables, t, args.fmt, sys.stdout.buffer, storage)
            sys.stdout.flush()
        else:
            with open(args.out, "wb") as f_out:
                write_export(tables, t, args.fmt, f_out, storage)
            if args.fmt == "labelstudio":
                names = ((tables.run.manifest.get("config") or {}).get("data") or {}).get("class_names") or \
                    [str(c) for c in range(tables.num_classes())]
                cfg_path = args.out.rsplit(".", 1)[0] + ".label_config.xml"
                with open(cfg_path, "w", encoding="utf-8") as f_cfg:
                    f_cfg.write(labeling_config(names))
                print(f"Label Studio labeling config: {cfg_path}", file=sys.stderr)
        print(f"{t.num_rows} rows written to {'standard output' if args.out == '-' else args.out}", file=sys.stderr)
    finally:
        tables.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
