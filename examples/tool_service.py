"""A tiny tool service for the example agent (examples/agents/orders.yaml): order statuses.

The bot POSTs each call of the agent's `check_order_status` tool here as JSON
`{"call_sid", "agent", "tool", "arguments", "parameters"}`, signed with
`X-Phonebot-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` under
TOOLS_WEBHOOK_SECRET. This service checks the signature (a request it can't verify gets
401 and is not acted on), then answers JSON the LLM reads to the caller: a made-up
delivery status for the order number. Replace `order_status` with a look-up in your own
system; keep `verify_signature` as it is.

Standard library only, so it runs anywhere:

    TOOLS_WEBHOOK_SECRET=dev-tools-secret python examples/tool_service.py   # port 8300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTE = "/tools/order-status"
MAX_BODY_BYTES = 64 * 1024
STATUSES = (
    {"status": "shipped", "carrier": "UPS", "expected": "Friday"},
    {"status": "out for delivery", "expected": "today before six"},
    {"status": "delivered", "delivered": "yesterday", "left": "at the front door"},
    {"status": "being packed", "ships": "tomorrow morning"},
)


def order_status(order_number: str) -> dict:
    """A made-up status, always the same for the same order number."""
    digits = "".join(ch for ch in order_number if ch.isalnum()).upper()
    if not digits:
        return {"found": False, "note": "No order number was given."}
    return {"found": True, "order_number": digits,
            **STATUSES[zlib.crc32(digits.encode()) % len(STATUSES)]}  # fmt: skip


# The receiver's check from phonebot.signing, copied as its comment asks (standard library).
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


def answer(secret: str, path: str, signature: str, body: bytes) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for one request: signature first, then the look-up."""
    if path != ROUTE:
        return 404, {"error": "no such tool"}
    if not verify_signature(secret, signature, body):
        return 401, {"error": "bad or missing X-Phonebot-Signature"}
    try:
        request = json.loads(body)
        order_number = str(request["arguments"]["order_number"])
    except (ValueError, KeyError, TypeError):
        return 400, {"error": "expected arguments.order_number"}
    return 200, order_status(order_number)


def handler_for(secret: str) -> type[BaseHTTPRequestHandler]:
    class ToolHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                status, reply = 413, {"error": "body too large"}
            else:
                body = self.rfile.read(length)
                signature = self.headers.get("X-Phonebot-Signature", "")
                status, reply = answer(secret, self.path, signature, body)
            encoded = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(encoded)))
            self.end_headers()
            self.wfile.write(encoded)

    return ToolHandler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The example agent's tool service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    args = parser.parse_args(argv)
    secret = os.environ.get("TOOLS_WEBHOOK_SECRET", "")
    if not secret:
        sys.exit("Set TOOLS_WEBHOOK_SECRET (the same value as the server's) to check requests.")
    server = ThreadingHTTPServer((args.host, args.port), handler_for(secret))
    print(f"Tool service on http://{args.host}:{args.port}{ROUTE}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
