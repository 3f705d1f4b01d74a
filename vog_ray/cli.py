"""``vog-ray``: the command line.

::

    vog-ray audit CONFIG.yaml [--set compute.batch_size=128] [--address ray://…] [--no-report] [--incremental]
    vog-ray report RUN_URL
    vog-ray compare RUN_A RUN_B [--out compare.json]
    vog-ray runs OUTPUT_URL
    vog-ray validate CONFIG.yaml [--set …]
    vog-ray explore RUN_OR_OUTPUT_URL [--port 8765] [--host 127.0.0.1]
    vog-ray export RUN [--where SQL] [--flagged] [--split S] [--top N] --to csv|parquet|jsonl|labelstudio [--out FILE]
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

from .config import ConfigError, load_config
from .storage import StorageOptions, redact_url

__all__ = ["main"]


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=getattr(args, "endpoint_url", None),
                          anonymous=getattr(args, "anonymous", False))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vog-ray", description="Rank every example of a dataset by Variance of Gradients, on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("audit", help="run an audit described by a YAML config")
    a.add_argument("config")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set compute.batch_size=128 (repeatable)")
    a.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else start Ray here)")
    a.add_argument("--no-report", action="store_true", help="skip the report")
    a.add_argument("--incremental", action="store_true",
                   help="fold only new checkpoints into the persisted moments (scheduled audits)")

    v = sub.add_parser("validate", help="validate a config and print it with defaults filled in")
    v.add_argument("config")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

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
    except ConfigError as e:
        print(f"error: {_redact(str(e))}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as e:
        return _reader_error_exit(e, args.verbose)
    except (FileNotFoundError, ValueError, RuntimeError, PermissionError, OSError) as e:
        print(f"error: {_redact(_root_message(e))}", file=sys.stderr)
        return 1


def _reader_error_exit(e: BaseException, verbose: bool) -> int:
    """A reader's ``KeyError`` (a split's file lacks a column the config names) or ``TypeError``
    (a label column of strings …), raised while planning or inside a Ray read task: input that
    can never be scored, so exit 2 with one ``error:`` line naming the file and the column (the
    traceback too with ``--verbose``)."""
    if verbose:
        traceback.print_exception(e)
    root = _root_cause(e)
    msg = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root) or type(root).__name__
    # Ray Data appends retry-tuning hints on the lines after the error itself
    print(f"error: {_redact(msg.strip().splitlines()[0])}", file=sys.stderr)
    return 2


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


def _root_cause(e: BaseException) -> BaseException:
    """The user's error, not Ray's wrapper around it."""
    seen = e
    while getattr(seen, "cause", None) is not None or seen.__cause__ is not None:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is seen:
            break
        seen = nxt
    return seen


def _root_message(e: BaseException) -> str:
    seen = _root_cause(e)
    return str(seen) if str(seen) else type(seen).__name__


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "validate":
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.cmd == "audit":
        cfg = load_config(args.config, args.overrides)
        report = False if args.no_report else None  # None: as the config's report.enabled says
        if args.incremental:
            from .distributed.incremental import run_incremental

            res = run_incremental(cfg, address=args.address, report=report)
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
        from .report import build_report

        from .report import findings_lines

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
        from .runs import list_runs

        for rid in list_runs(args.output, _storage(args)):
            print(rid)
        return 0
    if args.cmd == "explore":
        return _explore(args)
    if args.cmd == "export":
        return _export(args)
    raise AssertionError(args.cmd)


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
