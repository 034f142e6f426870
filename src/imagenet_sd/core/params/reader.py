"""Reading params.yaml: a section read with its dotted key path, so that every error names the
key, the value and what is allowed (`Section`); and the path checks stages make of what they read.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

from imagenet_sd.core.errors import UserError, missing_path, param_error

DEVICES = ("auto", "cpu", "cuda")


class Section:
    """A mapping of params.yaml read with its dotted key path, for error messages."""

    def __init__(self, raw: Any, key: str):
        if not isinstance(raw, dict):
            raise param_error(key, raw, "a mapping of keys to values")
        self.raw, self.key = raw, key

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str):
        if name not in self.raw:
            raise UserError(f"params.yaml: missing key {self.path(name)}; add it (see docs/parameters.md)")
        return self.raw[name]

    def section(self, name: str) -> "Section":
        return Section(self.get(name), self.path(name))

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.get(name)
        if value not in allowed:
            raise param_error(self.path(name), value, " | ".join(allowed))
        return value

    def number(self, name: str, kind: type, *, low=None, high=None, low_open=False) -> Any:
        value = self.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            name_of_kind = "an integer" if kind is int else "a number"
            error = param_error(self.path(name), value, f"{name_of_kind}{' ' + bounds if bounds else ''}")
            hint = read_as_text(value)
            raise UserError(f"{error}; {hint}") if hint else error
        return kind(value)

    def flag(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            raise param_error(self.path(name), value, "true or false")
        return value

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise param_error(self.path(name), value, "a string")
        return value

    def optional_path(self, name: str) -> Path | None:
        value = self.text(name)
        return expanded(value) if value.strip() else None

    def fraction_range(self, name: str) -> tuple[float, float]:
        value = self.get(name)
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) for v in value)
                or not 0 < value[0] <= value[1] <= 1):
            raise param_error(self.path(name), value, "[low, high] with 0 < low <= high <= 1")
        return float(value[0]), float(value[1])

    def no_unknown_keys(self, known: tuple[str, ...]) -> None:
        unknown = sorted(set(self.raw) - set(known))
        if unknown:
            raise UserError(
                f"params.yaml: unknown key {self.path(unknown[0])}; known keys here: {', '.join(known)}")


class Overlay(Section):
    """`base` with the keys `over` sets taken from `over` (a train recipe over a profile's train block);
    an error names the key the value was read from."""

    def __init__(self, base: Section, over: Section):
        super().__init__({**base.raw, **over.raw}, base.key)
        self.over = over

    def path(self, name: str) -> str:
        return self.over.path(name) if name in self.over.raw else super().path(name)


def keys_of(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def work_dir_at(s: Section) -> Path:
    value = s.text("work_dir")
    if not value.strip():
        raise param_error(s.path("work_dir"), value, "a folder kept between runs, e.g. ~/.cache/imagenet-sd/...")
    return expanded(value)


def expanded(value: str | Path) -> Path:
    # ~ and $VARS expand, so one params.yaml can name per-user or per-cluster folders
    # (scratch space, torch hub's and Hugging Face's caches under the home folder).
    return Path(os.path.expandvars(str(value))).expanduser()


_EXPONENT = re.compile(r"([-+]?)(\d*)\.?(\d*)[eE]([-+]?)(\d+)")


def read_as_text(value) -> str | None:
    """Why a value that looks like a number came out of params.yaml as a string, and how to write it;
    None when it is not such a string. YAML 1.1 (PyYAML) reads a float only with a dot and, in an
    exponent, a sign: 1e1, 1.0e1 and 1e-06 are strings, 10, 1.0e+1 and 1.0e-6 numbers; `dvc exp run
    -S key=0.000001` writes 1e-06 (DVC's YAML 1.2 writer)."""
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    text = value.strip()
    plain = format(Decimal(text), "f")
    match = _EXPONENT.fullmatch(text)
    if match is None:        # quoted, '10' or ' 1.5': no exponent to fix
        return f"YAML read it as text (quoted?); write it unquoted: {plain}"
    sign, whole, fraction, exp_sign, exponent = match.groups()
    scientific = f"{sign}{whole or '0'}.{fraction or '0'}e{exp_sign or '+'}{exponent}"
    return (f"YAML read it as text, not a number (YAML 1.1 needs a dot and a signed exponent): write it as "
            f"{plain} or {scientific} in params.yaml itself (dvc exp run -S writes such values, 1e-06, too)")


def as_number(v):
    """A number, or a string that is one: PyYAML reads 1.0e5 (no sign in the exponent) as a string."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def registered_name(s: Section, key: str) -> str:
    """A name a registry of a higher layer checks (the filters: filter/registry.py)."""
    value = s.text(key).strip()
    if not value:
        raise param_error(s.path(key), value, "a name, e.g. none")
    return value


def require_file(key: str, path: Path) -> Path:
    if not path.is_file():
        raise missing_path(key, path, "file")
    return path


def writable_dir(key: str, work_dir: Path, folder: Path | None = None) -> Path:
    """`folder` (default `work_dir`) created and written to once; UserError naming `key` if it cannot be."""
    folder = folder or work_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"params.yaml: {key} = {str(work_dir)!r}: cannot write there "
                        f"({exc.strerror or exc}); point it at a writable folder") from None
    return folder


def require_dir(key: str, path: Path) -> Path:
    if not path.is_dir():
        raise missing_path(key, path, "folder")
    return path
