"""The server's start-up heap is frozen out of the garbage collector's way
(phonebot.ops.heap): a full collection over it paused every call's audio."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from phonebot.ops.heap import CPYTHON_FULL_COLLECTION_EVERY, FULL_COLLECTION_EVERY
from phonebot.web.app import create_app
from tests.conftest import make_settings


def test_the_lifespan_freezes_the_start_up_heap_and_thaws_it_at_stop(tmp_path):
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'records.db'}", campaign_scheduler=False
    )
    gc.unfreeze()
    assert gc.get_threshold()[2] == CPYTHON_FULL_COLLECTION_EVERY == 10  # the default
    with TestClient(create_app(settings)):
        frozen = gc.get_freeze_count()
        # Everything alive after start-up: FastAPI, Pipecat, the models' wrappers...
        assert frozen > 50_000
        assert len(gc.get_objects()) < frozen / 10  # a collection walks only the rest
        # ...and full collections stay as rare as before the freeze, not ten times likelier.
        assert gc.get_threshold()[2] == FULL_COLLECTION_EVERY > CPYTHON_FULL_COLLECTION_EVERY
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[2] == CPYTHON_FULL_COLLECTION_EVERY
