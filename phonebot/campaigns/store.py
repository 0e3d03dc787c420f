"""Campaigns in the database: creating them, reading them, and claiming attempts.

Exactly once, across restarts and processes: an attempt is claimed, in one transaction,
BEFORE `calls.create`: the contact moves from `pending` to `calling` and the attempt row
(contact_id, number) is inserted. A second scheduler can neither see the contact as
pending nor insert the same attempt (primary key). On PostgreSQL the campaign row and its
contacts are locked while claiming (`SELECT … FOR UPDATE SKIP LOCKED`), so two processes
never count the same free places under max_concurrent and calls_per_minute; on SQLite the
claim starts with a write, which takes the database's single write lock.

What happens to a claim: `placed` (Twilio gave a CallSid), `not_placed` (Twilio refused for
certain: nobody rang), or `unknown` (no answer from Twilio, or the process died in
between: it may have rung, so it is never retried blindly). The outcome of a placed call
comes from its call record: the status callback's final CallStatus, the AMD verdict, the
end reason, and the outcome fields the bot recorded.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from phonebot.campaigns.contacts import Prepared
from phonebot.campaigns.models import (
    CLOSED,
    FINAL_STATES,
    CampaignDetail,
    CampaignIn,
    CampaignSummary,
    ContactOut,
    RetryIn,
    WindowIn,
)
from phonebot.campaigns.schema import Campaign, CampaignAttempt, CampaignContact
from phonebot.campaigns.windows import Window
from phonebot.config import Settings
from phonebot.dnc.store import listed, opted_out_since
from phonebot.records.events import EventDeliverer
from phonebot.records.schema import CallRecord
from phonebot.records.writer import IVR_FAILED_REASON, OPTED_OUT_REASON
from phonebot.twilio.amd import AMD_BY_BOT as BOT
from phonebot.twilio.dial_guard import check_destination
from phonebot.twilio.dialout import MachineDetection
from phonebot.twilio.statuses import FINAL_STATUSES

# Beyond MAX_CALL_DURATION_S, how long a placed call may go without a final status before
# it counts as lost: Twilio rings for up to 60 s, plus slack for a slow callback.
SILENT_CALL_MARGIN_S = 600
# How many due contacts one claim looks at (those outside their window are pushed to their
# next opening, so the next claim sees others).
CANDIDATES = 200
# Contacts per INSERT when a campaign is created (~10 ms of the event loop each).
INSERT_BATCH = 500
ACTIONS = {
    "pause": ({"scheduled", "running"}, "paused"),
    "resume": ({"paused"}, "running"),
    "cancel": ({"scheduled", "running", "paused"}, "canceled"),
}


class CampaignNotFound(LookupError):
    pass


class BadTransition(ValueError):
    """pause/resume/cancel from a status that doesn't allow it (HTTP 409)."""


@dataclass(frozen=True)
class Claim:
    """One attempt claimed for dialing: everything the dial needs, no row objects."""

    campaign_id: str
    contact_id: int
    number: int
    to: str
    from_number: str | None
    parameters: dict[str, str]
    customer_id: str | None
    machine_detection: MachineDetection


def detection_of(campaign: Campaign) -> MachineDetection:
    """The campaign's `machine_detection` as its calls ask for it: False, True (Twilio's
    AMD) or "bot"."""
    if campaign.machine_detection and campaign.machine_detection_by == BOT:
        return BOT
    return campaign.machine_detection


def new_id() -> str:
    return f"cmp_{secrets.token_hex(8)}"


def outcome_of(call: CallRecord) -> str:
    """What a finished call came to: busy, no-answer, failed, voicemail, opted-out,
    ivr_failed or completed (a conversation)."""
    if call.twilio_status in ("busy", "no-answer", "failed"):
        return call.twilio_status
    if call.twilio_status == "canceled" or call.end_reason == "fax":
        return "failed"
    if call.end_reason == OPTED_OUT_REASON:
        return "opted-out"
    if call.end_reason == IVR_FAILED_REASON:
        return "ivr_failed"  # a phone menu that led nowhere (phonebot.call.ivr)
    if call.end_reason == "voicemail" or (call.amd_verdict or "").startswith("machine"):
        return "voicemail"
    if call.stream_started_at is None:
        return "failed"  # answered, but the bot never got the stream (busy TwiML, an error)
    return "completed"


def call_is_over(call: CallRecord) -> bool:
    """The record says the call is finished and everything about it is written: the final
    status and, for a call that reached the bot, the end of its stream (written by the bot,
    which may land a moment after the status callback)."""
    if call.stream_started_at is not None:
        return call.ended_at is not None
    return call.twilio_status in FINAL_STATUSES


class CampaignStore:
    """Campaign rows for the API, the command line and the scheduler (one per app)."""

    def __init__(
        self,
        sessions: async_sessionmaker,
        settings: Settings,
        events: EventDeliverer | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._events = events
        self._staged = False  # events staged since the deliverer was last woken

    # --- creating and reading -----------------------------------------------------------
    async def create(self, body: CampaignIn, prepared: Prepared, now: datetime) -> Campaign:
        start_at = body.start_at
        status = "scheduled" if start_at is not None and start_at > now else "running"
        campaign = Campaign(
            id=new_id(), name=body.name, status=status, created_at=now, updated_at=now,
            parameters=body.parameters, from_number=body.from_,
            window_start=body.window.start, window_end=body.window.end,
            window_days=list(body.window.days), start_at=start_at, end_at=body.end_at,
            max_concurrent=body.max_concurrent, calls_per_minute=body.calls_per_minute,
            retry_attempts=body.retry.attempts, retry_delay_s=body.retry.delay_s,
            retry_on=list(body.retry.on), machine_detection=bool(body.machine_detection),
            machine_detection_by=BOT if body.machine_detection == BOT else None,
            duplicates=prepared.duplicates,
        )
        rows = [
            {"campaign_id": campaign.id, "row": c.row, "to_number": c.to,
             "timezone": c.timezone, "customer_id": c.customer_id,
             "parameters": c.parameters or None, "state": "pending", "attempts": 0,
             "updated_at": now}
            for c in prepared.contacts
        ]
        async with self._sessions.begin() as session:
            session.add(campaign)
            await session.flush()  # the campaign's row before its contacts' foreign keys
            # Bulk INSERTs, not 10,000 ORM objects (their unit of work held the event loop
            # for seconds), in batches: the loop runs other tasks between them.
            for start in range(0, len(rows), INSERT_BATCH):
                await session.execute(insert(CampaignContact), rows[start:start + INSERT_BATCH])
        return campaign

    async def get(self, campaign_id: str) -> CampaignDetail:
        async with self._sessions() as session:
            campaign = await session.get(Campaign, campaign_id)
            if campaign is None:
                raise CampaignNotFound(campaign_id)
            contacts = (await session.scalars(
                select(CampaignContact).where(CampaignContact.campaign_id == campaign_id)
                .order_by(CampaignContact.row)
            )).all()
            sids = await _call_sids(session, campaign_id)
        outs = [contact_out(c, sids.get(c.id, [])) for c in contacts]
        counts: dict[str, int] = {}
        for contact in contacts:
            counts[contact.state] = counts.get(contact.state, 0) + 1
        return CampaignDetail(
            **summary(campaign, counts).model_dump(),
            parameters=campaign.parameters or {},
            window=WindowIn(start=campaign.window_start, end=campaign.window_end,
                            days=campaign.window_days),
            max_concurrent=campaign.max_concurrent, calls_per_minute=campaign.calls_per_minute,
            retry=RetryIn(attempts=campaign.retry_attempts, delay_s=campaign.retry_delay_s,
                          on=campaign.retry_on),
            machine_detection=detection_of(campaign), start_at=campaign.start_at,
            end_at=campaign.end_at, duplicates=campaign.duplicates or [], contacts=outs,
        )

    async def list(self, limit: int = 100) -> list[CampaignSummary]:
        async with self._sessions() as session:
            campaigns = (await session.scalars(
                select(Campaign).order_by(Campaign.created_at.desc()).limit(limit)
            )).all()
            counts = await _counts(session, [c.id for c in campaigns])
        return [summary(c, counts.get(c.id, {})) for c in campaigns]

    async def act(self, campaign_id: str, action: str, now: datetime) -> str:
        """pause, resume or cancel; the new status. Cancel also cancels pending contacts
        (calls already ringing finish, and are not retried)."""
        allowed, target = ACTIONS[action]
        async with self._sessions.begin() as session:
            campaign = await session.get(Campaign, campaign_id, with_for_update=True)
            if campaign is None:
                raise CampaignNotFound(campaign_id)
            if campaign.status not in allowed:
                raise BadTransition(f"a {campaign.status} campaign can't {action}")
            if target == "running" and campaign.start_at and campaign.start_at > now:
                target = "scheduled"
            campaign.status, campaign.updated_at = target, now
            if target == "canceled":
                campaign.completed_at = now
                await session.execute(
                    update(CampaignContact)
                    .where(CampaignContact.campaign_id == campaign_id,
                           CampaignContact.state == "pending")
                    .values(state="canceled", updated_at=now)
                )
        return target

    # --- the scheduler's side ----------------------------------------------------------
    async def due_campaigns(self, now: datetime) -> list[str]:
        """Start scheduled campaigns whose start_at has come, close the finished ones, and
        return the ids of the running ones, oldest first."""
        async with self._sessions() as session:
            active = await session.scalar(
                select(func.count()).select_from(Campaign)
                .where(Campaign.status.in_(("scheduled", "running")))
            )
        if not active:
            return []  # idle: no write, no lock (SQLite has one writer for everything)
        async with self._sessions.begin() as session:
            await session.execute(
                update(Campaign)
                .where(Campaign.status == "scheduled",
                       or_(Campaign.start_at.is_(None), Campaign.start_at <= now))
                .values(status="running", updated_at=now)
            )
            # Locked: two processes must not both complete a campaign (two events).
            running = (await session.scalars(
                select(Campaign).where(Campaign.status == "running").order_by(Campaign.created_at)
                .with_for_update(skip_locked=True)
            )).all()
            for campaign in running:
                await self._expire(session, campaign, now)
            await session.flush()
            open_counts = await _counts(session, [c.id for c in running], ("pending", "calling"))
            for campaign in running:
                if not open_counts.get(campaign.id):
                    await self._complete(session, campaign, now)
            ids = [c.id for c in running if c.status == "running"]
        self._wake_events()
        return ids

    async def _expire(self, session: AsyncSession, campaign: Campaign, now: datetime) -> None:
        """Past end_at, contacts still waiting are not called any more."""
        if campaign.end_at is None or campaign.end_at > now:
            return
        expired = (await session.scalars(
            select(CampaignContact).where(CampaignContact.campaign_id == campaign.id,
                                          CampaignContact.state == "pending")
        )).all()
        for contact in expired:
            self._finish(session, contact, "expired", now)

    async def _complete(self, session: AsyncSession, campaign: Campaign, now: datetime) -> None:
        campaign.status, campaign.completed_at, campaign.updated_at = "completed", now, now
        counts = (await _counts(session, [campaign.id])).get(campaign.id, {})
        self._stage(session, "campaign.completed",
                    json.loads(summary(campaign, counts).model_dump_json()))

    async def ringing(self) -> int:
        """Placed campaign calls not yet streaming or over: each will need a call slot."""
        async with self._sessions() as session:
            return await session.scalar(
                select(func.count()).select_from(CampaignAttempt)
                .outerjoin(CallRecord, CallRecord.call_sid == CampaignAttempt.call_sid)
                .where(CampaignAttempt.status == "placed",
                       CallRecord.stream_started_at.is_(None),
                       or_(CallRecord.twilio_status.is_(None),
                           CallRecord.twilio_status.not_in(FINAL_STATUSES)))
            ) or 0

    async def claim(
        self, campaign_id: str, now: datetime, limit: int, claimer: str
    ) -> list[Claim]:
        """Claim up to `limit` due attempts of one campaign, within its caps and windows."""
        if limit <= 0:
            return []
        async with self._sessions.begin() as session:
            campaign = await self._lock(session, campaign_id, now)
            if campaign is None or campaign.status != "running":
                return []
            if campaign.start_at and campaign.start_at > now:
                return []
            room = min(limit, await self._room(session, campaign, now))
            if room <= 0:
                return []
            claims = await self._claim_contacts(session, campaign, now, room, claimer)
        self._wake_events()
        return claims

    async def _lock(
        self, session: AsyncSession, campaign_id: str, now: datetime
    ) -> Campaign | None:
        """The campaign row, locked for this claim; None when another process holds it."""
        if session.bind.dialect.name == "sqlite":
            # The first write takes SQLite's write lock, held to the commit.
            await session.execute(
                update(Campaign).where(Campaign.id == campaign_id).values(updated_at=now)
            )
            return await session.get(Campaign, campaign_id)
        return await session.scalar(
            select(Campaign).where(Campaign.id == campaign_id)
            .with_for_update(skip_locked=True)
        )

    async def _room(self, session: AsyncSession, campaign: Campaign, now: datetime) -> int:
        """Places left under max_concurrent (contacts calling) and calls_per_minute
        (attempts claimed in the last 60 s)."""
        calling = await session.scalar(
            select(func.count()).select_from(CampaignContact)
            .where(CampaignContact.campaign_id == campaign.id, CampaignContact.state == "calling")
        ) or 0
        recent = await session.scalar(
            select(func.count()).select_from(CampaignAttempt)
            .where(CampaignAttempt.campaign_id == campaign.id,
                   CampaignAttempt.claimed_at > now - timedelta(seconds=60))
        ) or 0
        return min(campaign.max_concurrent - calling, campaign.calls_per_minute - recent)

    async def _claim_contacts(
        self, session: AsyncSession, campaign: Campaign, now: datetime, room: int, claimer: str
    ) -> list[Claim]:
        due = (await session.scalars(_due(campaign.id, now))).all()
        blocked = await listed(session, [c.to_number for c in due])
        window = Window.of(campaign.window_start, campaign.window_end, campaign.window_days)
        claims: list[Claim] = []
        for contact in due:
            if len(claims) >= room:
                break
            if contact.to_number in blocked:
                self._finish(session, contact, "do_not_call", now)
            elif check_destination(contact.to_number, self._settings) is not None:
                self._finish(session, contact, "refused", now)
            elif not window.is_open(now, contact.timezone):
                contact.next_attempt_at = window.next_open(now, contact.timezone)
                if contact.next_attempt_at is None:
                    self._finish(session, contact, "expired", now)
            else:
                claims.append(self._claim_one(session, campaign, contact, now, claimer))
        return claims

    def _claim_one(
        self, session: AsyncSession, campaign: Campaign, contact: CampaignContact,
        now: datetime, claimer: str,
    ) -> Claim:
        contact.attempts += 1
        contact.state, contact.updated_at = "calling", now
        session.add(CampaignAttempt(
            contact_id=contact.id, number=contact.attempts, campaign_id=campaign.id,
            claimed_at=now, claimed_by=claimer, status="claimed",
        ))
        parameters = {**(campaign.parameters or {}), **(contact.parameters or {})}
        if contact.customer_id:
            parameters.setdefault("customer_id", contact.customer_id)
        return Claim(
            campaign_id=campaign.id, contact_id=contact.id, number=contact.attempts,
            to=contact.to_number, from_number=campaign.from_number, parameters=parameters,
            customer_id=contact.customer_id, machine_detection=detection_of(campaign),
        )

    async def placed(self, claim: Claim, call_sid: str, now: datetime) -> None:
        async with self._sessions.begin() as session:
            attempt = await session.get(CampaignAttempt, (claim.contact_id, claim.number))
            contact = await session.get(CampaignContact, claim.contact_id)
            attempt.status, attempt.call_sid, attempt.placed_at = "placed", call_sid, now
            contact.last_call_sid = call_sid

    async def not_placed(
        self, claim: Claim, now: datetime, error: str, *, unknown: bool = False,
        state: str | None = None,
    ) -> None:
        """calls.create failed. Unknown result: the contact is "unknown", never retried
        blindly. Certain failure: outcome "failed", retried as the policy says (or, with
        `state`, finished in that state, e.g. "refused")."""
        async with self._sessions.begin() as session:
            attempt = await session.get(CampaignAttempt, (claim.contact_id, claim.number))
            contact = await session.get(CampaignContact, claim.contact_id)
            campaign = await session.get(Campaign, claim.campaign_id)
            attempt.status = "unknown" if unknown else "not_placed"
            attempt.error, attempt.finished_at = error[:2000], now
            attempt.outcome = "unknown" if unknown else "failed"
            if unknown or state:
                self._finish(session, contact, state or "unknown", now, outcome=attempt.outcome)
            else:
                self._after(session, campaign, contact, "failed", now)
        self._wake_events()

    async def reap_unknown(self, now: datetime) -> int:
        """Claims never confirmed placed within CAMPAIGN_UNKNOWN_AFTER_S: the process died in
        calls.create, or its answer could not be saved. It may have rung: unknown."""
        cutoff = now - timedelta(seconds=self._settings.campaign_unknown_after_s)
        async with self._sessions.begin() as session:
            stale = await self._mark_unknown(
                session, CampaignAttempt.claimed_at, "claimed", cutoff, now,
                "never confirmed placed (the process stopped during calls.create?)",
            )
            lost = await self._reap_silent_calls(session, now)
        self._wake_events()
        return stale + lost

    async def _reap_silent_calls(self, session: AsyncSession, now: datetime) -> int:
        """Placed calls whose end never reached the records (a status callback lost while
        every server was down) would hold their max_concurrent place for ever: after the
        longest a call can last (MAX_CALL_DURATION_S) plus SILENT_CALL_MARGIN_S of ringing
        and slack, the attempt is "unknown"."""
        cutoff = now - timedelta(
            seconds=self._settings.max_call_duration_s + SILENT_CALL_MARGIN_S
        )
        return await self._mark_unknown(
            session, CampaignAttempt.placed_at, "placed", cutoff, now,
            "no final status for the call (status callback lost?)",
        )

    async def _mark_unknown(
        self, session: AsyncSession, since: InstrumentedAttribute[Any], status: str,
        cutoff: datetime, now: datetime, error: str,
    ) -> int:
        """Attempts in `status` since before `cutoff` may or may not have rung: each one
        and its contact (if still calling) end "unknown", never retried blindly."""
        stale = (await session.scalars(
            select(CampaignAttempt).where(CampaignAttempt.status == status, since < cutoff)
            .with_for_update(skip_locked=True)
        )).all()
        for attempt in stale:
            attempt.status, attempt.outcome, attempt.finished_at = "unknown", "unknown", now
            attempt.error = error
            contact = await session.get(CampaignContact, attempt.contact_id)
            if contact.state == "calling":
                self._finish(session, contact, "unknown", now, outcome="unknown")
        return len(stale)

    async def finish_calls(self, now: datetime) -> int:
        """Placed attempts whose call record says the call is over: decide each contact."""
        async with self._sessions.begin() as session:
            rows = (await session.execute(
                select(CampaignAttempt, CallRecord)
                .join(CallRecord, CallRecord.call_sid == CampaignAttempt.call_sid)
                .where(CampaignAttempt.status == "placed",
                       or_(CallRecord.ended_at.is_not(None),
                           CallRecord.twilio_status.in_(FINAL_STATUSES)))
                .with_for_update(skip_locked=True, of=CampaignAttempt)
            )).all()
            done = 0
            for attempt, call in rows:
                if not call_is_over(call):
                    continue
                await self._finish_attempt(session, attempt, call, now)
                done += 1
        self._wake_events()
        return done

    async def _finish_attempt(
        self, session: AsyncSession, attempt: CampaignAttempt, call: CallRecord, now: datetime
    ) -> None:
        outcome = outcome_of(call)
        contact = await session.get(CampaignContact, attempt.contact_id)
        campaign = await session.get(Campaign, attempt.campaign_id)
        attempt.status, attempt.outcome, attempt.finished_at = "finished", outcome, now
        if call.outcomes:
            contact.outcomes = {**(contact.outcomes or {}), **call.outcomes}
        if outcome == "completed" and await opted_out_since(
            session, contact.to_number, attempt.claimed_at
        ):
            outcome = "opted-out"  # the end reason was lost, the list entry was not
        self._after(session, campaign, contact, outcome, now)

    def _after(
        self, session: AsyncSession, campaign: Campaign, contact: CampaignContact,
        outcome: str, now: datetime,
    ) -> None:
        """The contact after an attempt's outcome: done, or pending again after delay_s."""
        contact.outcome = outcome
        if outcome == "completed":
            return self._finish(session, contact, "completed", now, outcome=outcome)
        if outcome == "opted-out":
            return self._finish(session, contact, "opted_out", now, outcome=outcome)
        retry_at = now + timedelta(seconds=campaign.retry_delay_s)
        if (
            outcome in campaign.retry_on
            and contact.attempts < campaign.retry_attempts
            and campaign.status not in CLOSED
            and (campaign.end_at is None or retry_at < campaign.end_at)
        ):
            contact.state, contact.next_attempt_at, contact.updated_at = "pending", retry_at, now
            return None
        state = "voicemail" if outcome == "voicemail" else "failed"
        return self._finish(session, contact, state, now, outcome=outcome)

    def _finish(
        self, session: AsyncSession, contact: CampaignContact, state: str, now: datetime,
        outcome: str | None = None,
    ) -> None:
        """The contact's last state; `contact.finished` goes out with the same commit."""
        assert state in FINAL_STATES, state
        contact.state, contact.updated_at, contact.next_attempt_at = state, now, None
        if outcome is not None:
            contact.outcome = outcome
        data = json.loads(contact_out(contact, []).model_dump_json())
        self._stage(session, "contact.finished", {"campaign_id": contact.campaign_id, **data})

    def _stage(self, session: AsyncSession, event_type: str, data: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.stage(session, event_type, data)
            self._staged = True

    def _wake_events(self) -> None:
        if self._events is not None and self._staged:
            self._staged = False
            self._events.wake()

    async def results(self, campaign_id: str) -> list[dict[str, Any]]:
        """One row per contact for results.csv."""
        detail = await self.get(campaign_id)
        return [
            {
                "row": c.row, "to": c.to, "customer_id": c.customer_id or "",
                "state": c.state, "attempts": c.attempts, "outcome": c.outcome or "",
                "outcomes": json.dumps(c.outcomes, ensure_ascii=False) if c.outcomes else "",
                "call_sids": " ".join(c.call_sids), "timezone": c.timezone,
            }
            for c in detail.contacts
        ]


RESULT_COLUMNS = ["row", "to", "customer_id", "state", "attempts", "outcome", "outcomes",
                  "call_sids", "timezone"]


def _due(campaign_id: str, now: datetime) -> Select:
    return (
        select(CampaignContact)
        .where(CampaignContact.campaign_id == campaign_id, CampaignContact.state == "pending",
               or_(CampaignContact.next_attempt_at.is_(None),
                   CampaignContact.next_attempt_at <= now))
        .order_by(CampaignContact.next_attempt_at.asc().nulls_first(), CampaignContact.row)
        .limit(CANDIDATES)
        .with_for_update(skip_locked=True)
    )


async def _counts(
    session: AsyncSession, ids: list[str], states: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """{campaign_id: {state: contacts}} for the given campaigns (and states)."""
    if not ids:
        return {}
    query = (
        select(CampaignContact.campaign_id, CampaignContact.state, func.count())
        .where(CampaignContact.campaign_id.in_(ids))
        .group_by(CampaignContact.campaign_id, CampaignContact.state)
    )
    if states is not None:
        query = query.where(CampaignContact.state.in_(states))
    counts: dict[str, dict[str, int]] = {}
    for campaign_id, state, count in (await session.execute(query)).all():
        counts.setdefault(campaign_id, {})[state] = count
    return counts


async def _call_sids(session: AsyncSession, campaign_id: str) -> dict[int, list[str]]:
    rows = await session.execute(
        select(CampaignAttempt.contact_id, CampaignAttempt.call_sid)
        .where(and_(CampaignAttempt.campaign_id == campaign_id,
                    CampaignAttempt.call_sid.is_not(None)))
        .order_by(CampaignAttempt.contact_id, CampaignAttempt.number)
    )
    sids: dict[int, list[str]] = {}
    for contact_id, call_sid in rows.all():
        sids.setdefault(contact_id, []).append(call_sid)
    return sids


def summary(campaign: Campaign, counts: dict[str, int]) -> CampaignSummary:
    return CampaignSummary(
        id=campaign.id, name=campaign.name, status=campaign.status,
        created_at=campaign.created_at, completed_at=campaign.completed_at,
        counts=dict(sorted(counts.items())), total=sum(counts.values()),
    )


def contact_out(contact: CampaignContact, call_sids: list[str]) -> ContactOut:
    sids = call_sids or ([contact.last_call_sid] if contact.last_call_sid else [])
    return ContactOut(
        row=contact.row, to=contact.to_number, customer_id=contact.customer_id,
        timezone=contact.timezone, state=contact.state, attempts=contact.attempts,
        outcome=contact.outcome, outcomes=contact.outcomes,
        next_attempt_at=contact.next_attempt_at, call_sids=sids,
    )
