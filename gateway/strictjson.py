"""Strict JSON: the one parser behind runtime frames and control API bodies.

Strict where parsers disagree, so that what the gateway accepts means the same to every peer:
duplicate keys (which one wins?), `NaN`/`Infinity` (not JSON), numbers that overflow a double,
and integers outside the signed 64-bit range (many parsers, orjson among them, cannot hold them).
Depth is bounded by the callers, which know their limits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Final, NoReturn

INT64_MIN: Final = -(1 << 63)
INT64_END: Final = 1 << 63  # one past the largest signed 64-bit integer


class Refused(ValueError):
    """Well-formed JSON text outside the protocol's JSON (raised from the parser's hooks)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Refused("an object has a duplicate key")
    return obj


def _no_constant(_: str) -> NoReturn:
    raise Refused("NaN and Infinity are not JSON numbers")


def _int(text: str) -> int:
    value = int(text) if len(text) <= 20 else INT64_END  # 20 digits: no int64 is longer
    if not INT64_MIN <= value < INT64_END:
        raise Refused("an integer is outside the signed 64-bit range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refused("a number overflows a double")
    return value


def _float_by_value(text: str) -> float:
    value = _float(text)
    # JSON Schema judges numbers by value: 1e19 is an integer there, and must fit like one.
    if value.is_integer() and not INT64_MIN <= value < INT64_END:
        raise Refused("an integral number is outside the signed 64-bit range")
    return value


def decoder(*, integers_by_value: bool = False) -> json.JSONDecoder:
    """A strict decoder; `integers_by_value` also bounds integral floats like `1e19` to 64 bits."""
    return json.JSONDecoder(
        object_pairs_hook=_object,
        parse_float=_float_by_value if integers_by_value else _float,
        parse_int=_int,
        parse_constant=_no_constant,
    )


def scanner(decoder: json.JSONDecoder) -> Callable[[str, int], tuple[Any, int]]:
    """The decoder's C scanner: about a third cheaper than `decode` on small, valid text."""
    scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
    return scan
