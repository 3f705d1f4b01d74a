"""``vog-ray``: the command line.

::

    vog-ray audit CONFIG.yaml [--set compute.batch_size=128] [--address HOST:PORT] [--no-report] [--incremental]
    vog-ray report RUN_URL
    vog-ray compare RUN_A RUN_B [--out compare.json]
    vog-ray runs OUTPUT_URL
    vog-ray validate CONFIG.yaml [--set …] [--check-io]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Sequence

from .config import ConfigError, load_config
from .distributed.cluster import UnsupportedAddress, check_address
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _redact_log_records()
    try:
        return _dispatch(args)
    except (ConfigError, UnsupportedAddress) as e:
        print(f"error: {_redact(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, PermissionError, OSError) as e:
        print(f"error: {_redact(_root_message(e))}{_cwd_gone(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - Ray's own errors (an actor that died in __init__ …)
        if type(e).__module__.split(".")[0] != "ray":
            raise
        print(f"error: {_redact(_root_message(e))}", file=sys.stderr)
        return 1


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


def _root_message(e: BaseException) -> str:
    """The user's error, not Ray's wrapper around it."""
    seen = e
    while getattr(seen, "cause", None) is not None or seen.__cause__ is not None:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is seen or not str(nxt):  # Ray Data's empty markers (``from SystemException()``)
            break
        seen = nxt
    msg = str(seen) if str(seen) else type(seen).__name__
    # an error raised in a Ray worker (an actor's __init__ …) arrives as text with the worker's
    # traceback: its last "SomeError: message" line is the user's error
    raised = [m.group(1) for m in _RAISED.finditer(msg.split("\n", 1)[-1])] if "\n" in msg else []
    return raised[-1] if raised else msg


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Refused|Held): (.+)$", re.M)


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
        if args.incremental:
            from .distributed.incremental import IncrementalConfigError, check_incremental_config, run_incremental

            try:
                check_incremental_config(cfg)
            except IncrementalConfigError as e:
                raise ConfigError(f"invalid config {args.config} for an incremental audit:\n  {e.key}: {e}") from None
            res = run_incremental(cfg, address=args.address, report=not args.no_report)
            if res is None:
                print("up to date: no new checkpoint")
                return 0
        else:
            from .distributed.audit import run_audit

            res = run_audit(cfg, address=args.address, report=False if args.no_report else None)
        print(res.summary())
        if cfg.report.enabled and not args.no_report:
            print(f"report: {res.run_url}/report.html")
        return 0
    if args.cmd == "report":
        from .report import build_report

        out = build_report(args.run, storage=_storage(args))
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
    raise AssertionError(args.cmd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
