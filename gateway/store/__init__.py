"""Durable state of the gateway: the `Store` contract and its embedded SQLite implementation."""

from gateway.store.base import NewInput, RunExists, Store, StoreError, UnknownRun

__all__ = ["NewInput", "RunExists", "Store", "StoreError", "UnknownRun"]
