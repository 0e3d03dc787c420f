"""The do-not-call list's API: `POST /dnc`, `GET /dnc`, `DELETE /dnc/{number}`.

Every dial checks the list first, campaign or `/dialout` (403 naming the list). Numbers are
kept in E.164, so "+1 (202) 555-0123" and "+12025550123" are one entry. The bot adds the
callers who ask not to be called again (the `opt_out` function; source "opt-out").
Behind ADMIN_API_KEY, like the call records, checked before a body is read.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status

from phonebot.campaigns.api import AuthFirstRoute
from phonebot.campaigns.models import DncAdded, DncIn, DncList
from phonebot.campaigns.service import Campaigns, get_campaigns
from phonebot.campaigns.store import dnc_number
from phonebot.records.api import require_admin_key

Service = Annotated[Campaigns, Depends(get_campaigns)]
router = APIRouter(
    prefix="/dnc", tags=["do-not-call"], dependencies=[Depends(require_admin_key)],
    route_class=AuthFirstRoute,  # the key before the body is read
)


@router.post("", response_model=DncAdded, status_code=status.HTTP_200_OK)
async def add_numbers(body: DncIn, campaigns: Service) -> DncAdded:
    """Add numbers; `added` counts those that were not on the list yet."""
    numbers = await asyncio.to_thread(normalised, body.numbers)  # CPU: off the event loop
    added = await campaigns.store.dnc_add(numbers, body.reason, source="api")
    return DncAdded(added=len(added), numbers=sorted(set(numbers)))


def normalised(texts: list[str]) -> list[str]:
    """Every number in E.164; 422 naming the first that is not a phone number."""
    numbers = []
    for index, text in enumerate(texts):
        number = dnc_number(text)
        if number is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": ["body", "numbers", index], "type": "value_error",
                  "msg": f"{text!r} is not a phone number (E.164, e.g. +12025550123)"}],
            )
        numbers.append(number)
    return numbers


@router.get("", response_model=DncList)
async def list_numbers(campaigns: Service) -> DncList:
    """Every number on the list, oldest first, with why and who added it."""
    return DncList(numbers=await campaigns.store.dnc_list())


@router.delete(
    "/{number}", status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "Not on the list"}},
)
async def remove_number(number: str, campaigns: Service) -> Response:
    """Take a number off the list (it may be called again)."""
    normalised = dnc_number(number) or number
    if not await campaigns.store.dnc_remove(normalised):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{normalised} is not on the list")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
