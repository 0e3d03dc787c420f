"""`X-Twilio-Signature`, computed exactly as Twilio does, by Twilio's own library.

Using `RequestValidator.compute_signature` (rather than re-implementing HMAC-SHA1 over the
URL and sorted form fields) means the emulator and the server agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"


def compute_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The signature Twilio would send for a POST of `params` to `url`."""
    return RequestValidator(auth_token).compute_signature(url, dict(params))


def validate_signature(
    auth_token: str, url: str, params: Mapping[str, str], signature: str
) -> bool:
    """Check a signature the way a Twilio-backed server does."""
    return RequestValidator(auth_token).validate(url, dict(params), signature)


def signed_headers(auth_token: str | None, url: str, params: Mapping[str, str]) -> dict[str, str]:
    """Headers for a webhook POST: the signature when a token is configured, else none."""
    if not auth_token:
        return {}
    return {SIGNATURE_HEADER: compute_signature(auth_token, url, params)}
