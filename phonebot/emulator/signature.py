"""`X-Twilio-Signature`, computed exactly as Twilio does, by Twilio's own library.

Using `RequestValidator.compute_signature` (rather than re-implementing HMAC over the URL
and sorted form fields) means the emulator and the server agree by construction.

Two ways Twilio signs (https://www.twilio.com/docs/usage/webhooks/webhook-shared-keys):
with the account's auth token (HMAC-SHA1, the default), or, when a Webhooks signing rule
matches the URL, with that rule's SharedKey and algorithm, announced in
`X-Twilio-Webhooks-Signature-Settings: key=<SharedKey id>,algorithm=HMAC_SHA256`. The
signed string is the same either way: the URL followed by the sorted POST parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twilio.request_validator import HMAC_SHA256, RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"


@dataclass(frozen=True)
class SharedKey:
    """A Twilio Webhooks SharedKey: its secret, the id Twilio names it by, its algorithm."""

    secret: str
    key_id: str = "webhooks_sharedkey_emulator0000000000000000"
    algorithm: str = HMAC_SHA256

    @property
    def settings_header(self) -> str:
        return f"key={self.key_id},algorithm={self.algorithm}"


def compute_signature(
    auth_token: str, url: str, params: Mapping[str, str], algorithm: str | None = None
) -> str:
    """The signature Twilio would send for a POST of `params` to `url`."""
    return RequestValidator(auth_token).compute_signature(url, dict(params), algorithm)


def validate_signature(
    auth_token: str, url: str, params: Mapping[str, str], signature: str
) -> bool:
    """Check a signature the way a Twilio-backed server does."""
    return RequestValidator(auth_token).validate(url, dict(params), signature)


def signed_headers(
    auth_token: str | None,
    url: str,
    params: Mapping[str, str],
    shared_key: SharedKey | None = None,
) -> dict[str, str]:
    """Headers for a webhook POST: the signature (auth token, or the SharedKey when given,
    with its settings header); none when neither is configured."""
    if shared_key is not None:
        signature = compute_signature(shared_key.secret, url, params, shared_key.algorithm)
        return {SIGNATURE_HEADER: signature, SIGNATURE_SETTINGS_HEADER: shared_key.settings_header}
    if not auth_token:
        return {}
    return {SIGNATURE_HEADER: compute_signature(auth_token, url, params)}
