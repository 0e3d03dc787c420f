"""The do-not-call list's API: `POST /dnc`, `GET /dnc`, `DELETE /dnc/{number}`.

Every dial checks the list first, campaign or `/dialout` (403 naming the list;
`phonebot.dnc.check`). Numbers are kept in E.164, so "+1 (202) 555-0123" and "+12025550123"
are one entry. The bot adds the callers who ask not to be called again (the `opt_out`
function; source "opt-out"). Behind ADMIN_API_KEY, like the call records, checked before a
body is read. The list lives in the campaigns' database, so it is reached through them:
503 with CALL_RECORDS=false, like the campaigns API.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status

from phonebot.campaigns.service import Campaigns
from phonebot.dnc.check import DoNotCallList
from phonebot.dnc.models import DncAdded, DncIn, DncList
from phonebot.dnc.store import dnc_number
from phonebot.web.auth import require_admin_key
from phonebot.web.campaigns_api import AuthFirstRoute
from phonebot.web.services import get_campaigns


def get_do_not_call(campaigns: Annotated[Campaigns, Depends(get_campaigns)]) -> DoNotCallList:
    """The app's list (503 without call records, from `get_campaigns`)."""
    return campaigns.dnc


DncListDep = Annotated[DoNotCallList, Depends(get_do_not_call)]
router = APIRouter(
    prefix="/dnc", tags=["do-not-call"], dependencies=[Depends(require_admin_key)],
    route_class=AuthFirstRoute,  # the key before the body is read
)


@router.post("", response_model=DncAdded, status_code=status.HTTP_200_OK)
async def add_numbers(body: DncIn, dnc: DncListDep) -> DncAdded:
    """Add numbers; `added` counts those that were not on the list yet."""
    numbers = await asyncio.to_thread(normalised, body.numbers)  # CPU: off the event loop
    added = await dnc.store.add(numbers, body.reason, source="api")
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
async def list_numbers(dnc: DncListDep) -> DncList:
    """Every number on the list, oldest first, with why and who added it."""
    return DncList(numbers=await dnc.store.entries())


@router.delete(
    "/{number}", status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "Not on the list"}},
)
async def remove_number(number: str, dnc: DncListDep) -> Response:
    """Take a number off the list (it may be called again)."""
    normalised = dnc_number(number) or number
    if not await dnc.store.remove(normalised):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{normalised} is not on the list")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
