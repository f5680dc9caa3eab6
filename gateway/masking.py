"""Mask secret values that a runtime echoes into its output events, as CI systems mask job logs.

On by default (`--no-mask-secrets` turns it off). A runtime that prints a secret it read must not
leak it to everyone who can read the run's outputs. Every string of the event is masked: keys and
values of `data` become `***`; `eventId` and `type` must keep matching their schema patterns, so
there the value becomes `masked` (the same every time, so an idempotent re-publish still matches
what was stored). Values shorter than `MIN_SECRET_LENGTH` are not masked: masking "1" or "yes"
everywhere would destroy output and protect nothing.

A marker can itself spell a secret, or spell one with the text around it (a secret "mask" in
`evt-mask-1` would come back as `evt-masked-1`; "ked-" would reappear at the seam). A string still
showing a secret after masking is replaced whole by a marker shorter than any maskable secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    events: Sequence[OutputEvent], secret_values: Iterable[str]
) -> Sequence[OutputEvent]:
    """The events with every occurrence of a secret value replaced (see the module's doc)."""
    values = sorted(
        {v for v in secret_values if len(v) >= MIN_SECRET_LENGTH}, key=len, reverse=True
    )
    if not values or not _may_contain(events, values):
        return events
    return [
        evolve(
            event,
            event_id=_mask(event.event_id, values, MASK_IN_IDS, WHOLE_MASK_IN_IDS),
            type=_mask(event.type, values, MASK_IN_IDS, WHOLE_MASK_IN_IDS),
            data=_mask(event.data, values, MASK, WHOLE_MASK),
        )
        for event in events
    ]


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
    if isinstance(value, dict):
        return {
            _mask(k, secrets, mask, whole): _mask(v, secrets, mask, whole)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(item, secrets, mask, whole) for item in value]
    return value
