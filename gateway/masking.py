"""Mask secret values that a runtime echoes into its output events, as CI systems mask job logs.

On by default (`--no-mask-secrets` turns it off). A runtime that prints a secret it read must not
leak it to everyone who can read the run's outputs. Every string of the event is masked: keys and
values of `data` become `***` (a number whose JSON text shows a secret becomes the string `***`
whole); `eventId` and `type` must keep matching their schema patterns, so there the value becomes
`masked` (the same every time, so an idempotent re-publish still matches what was stored). Values
shorter than `MIN_SECRET_LENGTH` are not masked: masking "1" or "yes" everywhere would destroy
output and protect nothing.

A marker can itself spell a secret, or spell one with the text around it (a secret "mask" in
`evt-mask-1` would come back as `evt-masked-1`; "ked-" would reappear at the seam). A string still
showing a secret after masking is replaced whole by a marker shorter than any maskable secret.

Masking can make two keys of one object equal (`token=A` and `token=B` both become `token=***`).
Keeping one would drop data the gateway accepted, so each key that would land on a name already
taken gets a spare marker of its own (`**1`, `**2`, ...): as short, so it cannot hold a secret
either, and chosen in the object's order, so a re-publish masks to the same object.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from attrs import evolve

from statemachine.messages import OutputEvent

MASK = "***"
MASK_IN_IDS = "masked"  # matches the eventId and type patterns, unlike MASK
MIN_SECRET_LENGTH = 4
# Too short to hold any secret that is masked; what a string becomes when masking left one in view.
WHOLE_MASK = "***"
WHOLE_MASK_IN_IDS = "xxx"


def mask_events(
    events: Sequence[OutputEvent],
    secret_values: Iterable[str],
    id_secret_values: Iterable[str] | None = None,
) -> Sequence[OutputEvent]:
    """The events with every occurrence of a secret value replaced (see the module's doc).

    `id_secret_values`, when given, are the ones masked in `eventId`: a re-publish is matched by
    its eventId, so those must be secrets that do not change while the run lives.
    """
    values = _maskable(secret_values)
    id_values = values if id_secret_values is None else _maskable(id_secret_values)
    if not values or not _may_contain(events, values):
        return events
    return [
        evolve(
            event,
            event_id=_mask(event.event_id, id_values, MASK_IN_IDS, WHOLE_MASK_IN_IDS),
            type=_mask(event.type, values, MASK_IN_IDS, WHOLE_MASK_IN_IDS),
            data=_mask(event.data, values, MASK, WHOLE_MASK),
        )
        for event in events
    ]


def _maskable(secret_values: Iterable[str]) -> list[str]:
    """Values long enough to mask, longest first (a secret containing another is masked whole)."""
    return sorted({v for v in secret_values if len(v) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def _may_contain(events: Sequence[OutputEvent], secrets: list[str]) -> bool:
    """Whether any secret may occur in the events' strings: one C-speed search of their JSON.

    Almost no batch holds a secret, and walking every event in Python costs more than the rest
    of its journey. JSON escapes character by character, so a secret inside any string of the
    events shows up, escaped the same way, in the JSON text of all of them. (A hit that spans two
    strings is possible, and only costs the exact walk.)
    """
    text = orjson.dumps([(event.event_id, event.type, event.data) for event in events])
    return any(orjson.dumps(secret)[1:-1] in text for secret in secrets)


def _mask(value: Any, secrets: list[str], mask: str, whole: str) -> Any:
    if isinstance(value, str):
        masked, replaced = value, False
        for secret in secrets:  # longest first, so a secret containing another is masked whole
            if secret in masked:
                masked, replaced = masked.replace(secret, mask), True
        # Not `masked is not value`: replacing "masked" by "masked" returns the very same string.
        if replaced and any(secret in masked for secret in secrets):
            return whole  # the marker, alone or with its neighbours, spelled a secret
        return masked
    if type(value) is int or type(value) is float:  # not bool: `true` shows no secret
        # A secret parsed into a number (a PIN, an account number) shows as plainly in the
        # number's JSON text, which is what readers of the outputs get. Masked whole: a number
        # cannot be masked in part.
        text = orjson.dumps(value).decode()
        return whole if any(secret in text for secret in secrets) else value
    if isinstance(value, dict):
        return _mask_object(value, secrets, mask, whole)
    if isinstance(value, list):
        return [_mask(item, secrets, mask, whole) for item in value]
    return value


def _mask_object(
    value: dict[str, Any], secrets: list[str], mask: str, whole: str
) -> dict[str, Any]:
    keys = [(_mask(key, secrets, mask, whole), key) for key in value]
    taken = {new for new, old in keys if new == old}  # keys without a secret keep their names
    spares: Iterator[str] | None = None
    masked: dict[str, Any] = {}
    for new, old in keys:
        if new != old:
            if new in taken:  # another key already has this name: both must survive
                spares = spares or _spare_markers()
                new = next(marker for marker in spares if marker not in taken)
            taken.add(new)
        masked[new] = _mask(value[old], secrets, mask, whole)
    return masked


# Spare markers count in this base: digits, ASCII letters, then the Basic Multilingual Plane from
# U+00A1 up to the surrogates, so three places are never used up (~1.7e14 keys).
_SPARE_BASE = 62 + (0xD800 - 0xA1)


def _spare_digit(index: int) -> str:
    if index < 10:
        return chr(ord("0") + index)
    if index < 36:
        return chr(ord("a") + index - 10)
    if index < 62:
        return chr(ord("A") + index - 36)
    return chr(0xA1 + index - 62)


def _spare_markers() -> Iterator[str]:
    """`**1`, `**2`, ...: distinct, at most three characters long (none of them holds a secret)."""
    for number in itertools.count(1):
        digits = ""
        while number:
            number, index = divmod(number, _SPARE_BASE)
            digits = _spare_digit(index) + digits
        yield digits.rjust(len(WHOLE_MASK), "*")
