"""Twilio's call statuses, in the one place every part of phonebot reads them from.

A call moves queued → initiated → ringing → in-progress and ends in one final status
(https://www.twilio.com/docs/voice/api/call-resource#call-status-values).
"""

from __future__ import annotations

# The statuses a call passes through, in Twilio's order.
PROGRESS_STATUSES = ("queued", "initiated", "ringing", "in-progress")
# The statuses a call ends in: nothing follows one. A tuple, so pages list them in this order.
FINAL_STATUSES = ("completed", "busy", "no-answer", "failed", "canceled")
CALL_STATUSES = frozenset(PROGRESS_STATUSES + FINAL_STATUSES)
