"""The one error type a user sees for a bad setting, and the checks of plain settings that raise it."""

from __future__ import annotations

import numbers
from typing import Any


class ConfigError(ValueError):
    """A setting is invalid. The message names the key, the bad value, what is allowed and the fix.

    Raised before any data or model is loaded, so nothing already written is touched.
    """


def bad_setting(key: str, value: Any, allowed: str, fix: str = "") -> ConfigError:
    """The ConfigError of a bad setting: the key, its value, what is allowed and the fix."""
    return ConfigError(f"{key}={value!r} is invalid: allowed {allowed}. Fix: {fix or f'set {key}'}.")


def check_int(key: str, value: Any, lo: int, hi: int | None = None, example: Any = None) -> int:
    """`value`, the setting `key`, as an int when it is a whole number (not a bool) in [lo, hi] (hi None: no
    upper bound); else ConfigError naming the key, the range and, given `example`, a value that would do."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if whole and lo <= value and (hi is None or value <= hi):
        return int(value)
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    raise bad_setting(key, value, allowed, f"e.g. {key}={example}" if example is not None else "")


def check_bool(key: str, value: Any) -> bool:
    """`value`, the setting `key`, when it is true or false; else ConfigError naming the key."""
    if not isinstance(value, bool):
        raise bad_setting(key, value, "true or false", f"{key}=true or {key}=false")
    return value
