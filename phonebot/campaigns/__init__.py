"""Outbound campaigns: contacts called within their hours, exactly once per attempt, retried
by outcome (docs/campaigns.md); their routes are in phonebot/web/, their tables on db/."""
