"""Pipecat's OpenAI LLM service on a connection pool it is given (phonebot.ai.http_pool).

Why a subclass: `OpenAILLMService` builds its `AsyncOpenAI` client in its constructor
through `create_client`, the method Pipecat's OpenAI-compatible services override to
build theirs; unlike its STT and TTS siblings it takes no `http_client`. Overriding it
is the way Pipecat offers to choose the client.
"""

from __future__ import annotations

from typing import Any

import httpx2
from openai import AsyncOpenAI
from pipecat.services.openai.llm import OpenAILLMService

__all__ = ["PooledOpenAILLMService"]


class PooledOpenAILLMService(OpenAILLMService):
    """`OpenAILLMService` whose client uses `http_client` (None: Pipecat's own client)."""

    def __init__(self, *, http_client: httpx2.AsyncClient | None = None, **kwargs: Any) -> None:
        self._pooled_http_client = http_client  # read by create_client, during super().__init__
        super().__init__(**kwargs)

    def create_client(
        self,
        api_key=None,
        base_url=None,
        organization=None,
        project=None,
        default_headers=None,
        **kwargs,
    ):
        """Pipecat's client, on the pool when there is one."""
        if self._pooled_http_client is None:
            return super().create_client(
                api_key, base_url, organization, project, default_headers, **kwargs
            )
        return AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            organization=organization,
            project=project,
            http_client=self._pooled_http_client,
            default_headers=default_headers,
        )
