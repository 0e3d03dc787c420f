"""Twilio-shaped identifiers (CallSid, AccountSid, StreamSid)."""

from __future__ import annotations

import secrets


def new_sid(prefix: str) -> str:
    """A Twilio SID: two-letter prefix + 32 lowercase hex digits (e.g. `CA…`, `MZ…`)."""
    return prefix + secrets.token_hex(16)


def new_call_sid() -> str:
    """A fresh `CA…` call SID."""
    return new_sid("CA")


def new_account_sid() -> str:
    """A fresh `AC…` account SID (for when no real one is configured)."""
    return new_sid("AC")


def new_stream_sid() -> str:
    """A fresh `MZ…` media stream SID."""
    return new_sid("MZ")
