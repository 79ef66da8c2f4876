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


def broker(doc: dict[str, Any]) -> BrokerConfig:
    return section(BrokerConfig, doc, "broker")


def resolve(base: Path, value: str | Path) -> Path:
    """A path from a config file, relative to the file's directory."""
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()
