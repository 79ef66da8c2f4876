"""TOML config loading shared by the daemons: sections into frozen dataclasses, unknown keys rejected."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from protocol.session import BrokerConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file is unreadable, has unknown keys or bad values."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc


def section(cls: type[T], doc: dict[str, Any], name: str, **extra: Any) -> T:
    """Build ``cls`` from table ``name`` of ``doc``; unknown keys and bad values raise ``ConfigError``."""
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    allowed = {f.name for f in fields(cls)} - set(extra)  # type: ignore[arg-type]
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return cls(**table, **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{name}]: {exc}") from exc


def load_daemon(cls: type[T], path: Path, name: str, *, paths: tuple[str, ...] = (),
                path_lists: tuple[str, ...] = (), lists: tuple[str, ...] = (), tables: tuple[str, ...] = ()) -> T:
    """A daemon's config from table ``name`` and ``[broker]`` of a TOML file.

    Each of ``tables`` is passed as a plain dict to the field of the same name (which validates it).
    Keys in ``paths`` (and each item of ``path_lists``) are resolved relative to the file's directory;
    arrays in ``path_lists`` and ``lists`` become tuples.
    """
    doc = read_toml(path)
    unknown = sorted(set(doc) - {name, "broker", *tables})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}")
    base = path.resolve().parent
    table = dict(doc.get(name, {}))
    for key in paths:
        if key in table:
            table[key] = _resolve(base, table[key])
    for key in path_lists:
        if key in table:
            table[key] = tuple(_resolve(base, v) for v in table[key])
    for key in lists:
        if key in table:
            table[key] = tuple(table[key])
    broker = doc.get("broker", {})
    if isinstance(broker, dict) and isinstance(broker.get("ca_file"), str) and broker["ca_file"]:
        broker = {**broker, "ca_file": str(_resolve(base, broker["ca_file"]))}
    more = {t: doc[t] for t in tables if t in doc}
    for t, value in more.items():
        if not isinstance(value, dict):
            raise ConfigError(f"[{t}] must be a table")
        if t in table:
            raise ConfigError(f"{t!r} belongs in its own [{t}] table")
    return section(cls, {name: table}, name, broker=section(BrokerConfig, {"broker": broker}, "broker"), **more)


def _resolve(base: Path, value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()
