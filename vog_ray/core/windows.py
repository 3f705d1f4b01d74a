"""The window grammar: which checkpoints a named window ("stage") of an audit covers.

One parser (:func:`parse_window`) serves the config check (syntax only, before the checkpoints
are listed), :func:`resolve_windows` (indices, once the count is known) and the incremental
audit's rule that windows must not slide as checkpoints are appended (:attr:`Window.slides`).
Forms: ``"all"``, ``"first:N"`` / ``"early:N"``, ``"last:N"`` / ``"late:N"``, a Python slice
``"a:b"`` (``"-3:"``), or a list of indices (negative ones count from the end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Window", "parse_window", "check_window_spec", "resolve_windows", "DEFAULT_WINDOWS",
           "MIN_CHECKPOINTS_PER_WINDOW"]

DEFAULT_WINDOWS: dict[str, Any] = {"all": "all"}
# VoG is a standard deviation across a window's checkpoints: over one checkpoint it is 0 for every
# example by definition (every z 0, ranks in id order), so a window needs at least two
MIN_CHECKPOINTS_PER_WINDOW = 2
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_COUNT = re.compile(r"(first|last|early|late):(\d+)")
_SLICE = re.compile(r"(-?\d*):(-?\d*)")
_FORMS = "use 'all', 'first:N', 'last:N', 'a:b' or a list of indices"


@dataclass(frozen=True)
class Window:
    """One parsed window spec (``kind``: all | first | last | slice | indices)."""

    name: str
    spec: Any
    kind: str
    n: int = 0                                  # first / last
    start: int | None = None                    # slice
    stop: int | None = None                     # slice
    indices: tuple[int, ...] = ()               # indices

    @property
    def slides(self) -> bool:
        """Whether the window moves when checkpoints are appended (``last:N``, negative slices
        or indices): such a window cannot be folded incrementally."""
        if self.kind == "last":
            return True
        if self.kind == "slice":
            return (self.start is not None and self.start < 0) or (self.stop is not None and self.stop < 0)
        return self.kind == "indices" and any(i < 0 for i in self.indices)

    def resolve(self, K: int) -> list[int]:
        """Sorted checkpoint indices (0-based) among ``K`` checkpoints."""
        name, s = self.name, self.spec
        if self.kind == "all":
            idx = list(range(K))
        elif self.kind in ("first", "last"):
            if self.n <= 0:
                raise ValueError(f"window {name!r} = {s!r}: needs at least one checkpoint")
            if self.n > K:
                raise ValueError(f"window {name!r} = {s!r} asks for {self.n} checkpoints, but only {K} exist")
            idx = list(range(self.n)) if self.kind == "first" else list(range(K - self.n, K))
        elif self.kind == "slice":
            idx = list(range(K))[slice(self.start, self.stop)]
            if self.start is not None and not -K <= self.start < K:
                raise ValueError(f"window {name!r} = {s!r} starts past the {K} checkpoints")
            if self.stop is not None and not -K <= self.stop <= K:
                raise ValueError(f"window {name!r} = {s!r} ends past the {K} checkpoints")
        else:
            for i in self.indices:
                if not -K <= i < K:
                    raise ValueError(f"window {name!r} names checkpoint {i}, but only {K} exist (0..{K - 1})")
            idx = sorted({i % K for i in self.indices})
        if not idx:
            raise ValueError(f"window {name!r} = {s!r} selects no checkpoint of the {K}")
        if len(idx) < MIN_CHECKPOINTS_PER_WINDOW:
            raise ValueError(f"window {name!r} = {s!r} covers {len(idx)} checkpoint (index {idx[0]}) of the {K}: "
                             f"VoG over one checkpoint is 0 for every example; a window needs at least "
                             f"{MIN_CHECKPOINTS_PER_WINDOW} distinct checkpoints")
        return idx


def parse_window(name: Any, spec: Any) -> Window:
    """Parse one window spec; a bad name or spec raises ``ValueError`` naming the window."""
    if not _NAME.fullmatch(str(name)):
        raise ValueError(f"window name {name!r} must be alphanumeric (it becomes a column name)")
    name = str(name)
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return Window(name, spec, "all")
        m = _COUNT.fullmatch(s)
        if m:
            return Window(name, s, "first" if m.group(1) in ("first", "early") else "last", n=int(m.group(2)))
        m = _SLICE.fullmatch(s)
        if m:
            a, b = m.groups()
            return Window(name, s, "slice", start=int(a) if a not in ("", "-") else None,
                          stop=int(b) if b not in ("", "-") else None)
        raise ValueError(f"window {name!r}: cannot parse {spec!r} ({_FORMS})")
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in spec):
        return Window(name, spec, "indices", indices=tuple(int(i) for i in spec))
    raise ValueError(f"window {name!r}: unsupported spec {spec!r}")


def check_window_spec(name: Any, spec: Any) -> None:
    """Syntax check of one window spec (the checkpoint count is checked by :func:`resolve_windows`)."""
    parse_window(name, spec)


def resolve_windows(spec: dict[str, Any] | None, num_checkpoints: int) -> dict[str, list[int]]:
    """Window specs → sorted checkpoint indices (0-based, in checkpoint order) among
    ``num_checkpoints``. An empty spec means :data:`DEFAULT_WINDOWS`."""
    K = int(num_checkpoints)
    if K <= 0:
        raise ValueError("zero checkpoints: VoG needs at least one checkpoint")
    return {w.name: w.resolve(K) for w in (parse_window(n, s) for n, s in (spec or DEFAULT_WINDOWS).items())}
