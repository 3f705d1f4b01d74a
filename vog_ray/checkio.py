"""``vog-ray validate --check-io``: what an audit of a config would read and write, checked without
Ray — the checkpoints (in order, with sizes), every split's input files and rows, and a probe
write under ``output.url``. An error names the config key it comes from."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .config import AuditConfig

__all__ = ["check_io", "FILES_SHOWN"]

FILES_SHOWN = 5  # input files printed per split (first and last); the counts cover all of them


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_io(cfg: "AuditConfig") -> list[str]:
    """The report's lines; raises (naming the key) when something cannot be read or written."""
    from .config import redact
    from .data.identity import split_inputs
    from .distributed.audit import count_config_rows, list_config_checkpoints
    from .distributed.publish import check_writable
    from .storage import resolve

    storage = cfg.storage.options()
    urls = list_config_checkpoints(cfg, storage)
    lines = [f"checkpoints: {len(urls)} (in this order)"]
    for u in urls:
        fs, path = resolve(u, storage)
        lines.append(f"  {redact(u)}  {_mb(int(fs.info(path).get('size') or 0))}")
    rows = count_config_rows(cfg, storage)
    for name, spec in cfg.data.splits.items():
        try:
            files = split_inputs(spec, storage)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.splits.{name}.url: {e}") from None
        lines.append(f"data.splits.{name}: {len(files)} file(s), {_mb(sum(f.size for f in files))}, "
                     f"{rows[name]} rows")
        shown = files if len(files) <= FILES_SHOWN else [*files[:FILES_SHOWN - 1], None, files[-1]]
        for f in shown:
            lines.append(f"  … {len(files) - FILES_SHOWN} more" if f is None else f"  {redact(f.path)}")
    check_writable(cfg.output.url, storage)
    fs, work = resolve(cfg.output.url.rstrip("/") + "/_work", storage)
    if fs.exists(work) and not fs.ls(work):  # the probe's directory, on a local output
        fs.rm(work, recursive=True)
    lines.append(f"output.url: {redact(cfg.output.url)} is writable")
    return lines
