"""Signed POSTs to the user's systems: the events webhook and the agents' HTTP tools.

Both send

    X-Phonebot-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

keyed with their own secret (EVENTS_WEBHOOK_SECRET, TOOLS_WEBHOOK_SECRET): the scheme
Stripe uses, where the timestamp inside the signed text stops a captured request from
being replayed later. One scheme in one place, so a receiver checks both with the same
function (`verify_signature`, standard library only, written to be copied).
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Phonebot-Signature"


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """The header value signing `body` (the exact bytes sent) at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


# --- For receivers: copy this function (standard library only) ---------------------------
def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """True when `header` (X-Phonebot-Signature) signs `body` (the raw request bytes) with
    `secret`, at a time within `tolerance_s` of now. Any v1 value may match (several appear
    while a secret is being rotated)."""
    import hashlib
    import hmac
    import time

    try:
        parts = [item.split("=", 1) for item in header.split(",")]
        timestamp = int(next(value for key, value in parts if key.strip() == "t"))
        signatures = [value.strip() for key, value in parts if key.strip() == "v1"]
    except (ValueError, StopIteration):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    # Bytes: a non-ASCII signature is a mismatch, where a str compare_digest would raise.
    return any(
        hmac.compare_digest(expected.encode(), signature.encode()) for signature in signatures
    )
# ------------------------------------------------------------------------------------------
