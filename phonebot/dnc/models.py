"""The do-not-call API's request and response bodies (`phonebot.web.dnc_api`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class DncIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    numbers: list[str] = Field(min_length=1, max_length=10_000)
    reason: str | None = Field(None, max_length=255)


class DncEntry(BaseModel):
    number: str
    reason: str | None
    source: str | None
    created_at: datetime


class DncList(BaseModel):
    numbers: list[DncEntry]


class DncAdded(BaseModel):
    added: int
    numbers: list[str]
