"""The job request contract, validated with pydantic at the API and trusted downstream."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tasks.routing import fair_queue
from tasks.webhooks import ssrf
from tasks.webhooks.store import DEFAULT_EVENTS, EVENTS


def _storable(value: str) -> str:
    """Postgres jsonb cannot hold NUL, and a lone surrogate is not text."""
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
NonEmptyText = Annotated[Text, Field(min_length=1)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("message content must not be empty")
        return v


class Routing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: str | None = None
    # Follow-up turns of one conversation share a session id; prefix_affinity keeps them on one node.
    session_id: Text | None = Field(None, min_length=1, max_length=200)

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str | None, info: ValidationInfo) -> str | None:
        allowed = (info.context or {}).get("strategies")
        if v is not None and allowed is not None and v not in allowed:
            raise ValueError(f"unknown routing strategy {v!r}; use one of: {', '.join(allowed)}")
        return v


class Webhook(BaseModel):
    """Where and for which events to POST the job (Standard Webhooks, signed with the tenant's secret)."""

    model_config = ConfigDict(extra="forbid")

    url: Text = Field(max_length=2048)
    events: list[Literal[EVENTS]] = Field(default_factory=lambda: list(DEFAULT_EVENTS), min_length=1)

    @field_validator("url")
    @classmethod
    def _safe(cls, v: str, info: ValidationInfo) -> str:
        # Resolves the host and refuses internal addresses; checked again before every delivery.
        ssrf.check_url(v, ssrf.AllowList.parse((info.context or {}).get("webhook_allow", ())))
        return v.strip()

    @field_validator("events")
    @classmethod
    def _dedupe(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class RagSpec(BaseModel):
    """A job's retrieval phase: search these collections with the query (the last user message, or the
    prompt) and place the top_k passages in the prompt, numbered for citation."""

    model_config = ConfigDict(extra="forbid")

    collections: list[uuid.UUID] = Field(min_length=1, max_length=8)
    top_k: int | None = Field(None, ge=1, le=20)  # default: settings.rag_top_k
    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    filter: dict[Text, object] | None = None

    @field_validator("collections")
    @classmethod
    def _dedupe(cls, v: list[uuid.UUID]) -> list[uuid.UUID]:
        return list(dict.fromkeys(v))


class JobRequest(BaseModel):
    """Body of POST /v1/jobs. Give exactly one of `messages` (chat) or `prompt` (plain completion)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: Text | None = None
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[NonEmptyText] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_attempts: int | None = Field(None, ge=1, le=20)  # default: settings.max_attempts
    routing: Routing | None = None
    metadata: dict[Text, Text | int | float | bool | None] = Field(default_factory=dict, max_length=32)
    webhook: Webhook | None = None
    rag: RagSpec | None = None
    # Opt in to the exact-match result cache (tasks/jobs/cache.py): temperature 0, no rag.
    cache: bool = False
    # `interactive` jobs are dispatched before `batch` ones; batch work fills the capacity left over.
    priority: Literal[fair_queue.CLASSES] = fair_queue.INTERACTIVE
    # Stream the text as it is produced: token deltas on GET /v1/jobs/{id}/events (tasks/jobs/events.py).
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_tokens_limit")
        if v is not None and limit is not None and v > limit:
            raise ValueError(f"max_tokens must be at most {limit}")
        return v

    @model_validator(mode="after")
    def _one_input(self) -> "JobRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (a chat) or `prompt` (plain text)")
        return self

    @field_validator("cache")
    @classmethod
    def _cacheable(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("temperature", 1.0) != 0:
            raise ValueError("only deterministic requests are cached: set `temperature` to 0, or drop `cache`")
        if v and info.data.get("rag") is not None:
            raise ValueError("a job with `rag` cannot use the cache (retrieved context changes as collections do)")
        return v

    def sampling(self) -> dict:
        """The fields the engine needs, as stored with the job."""
        return self.model_dump(include={"max_tokens", "temperature", "top_p", "stop", "seed"})


# --- retrieval: collections, documents, search ------------------------------------------------------

Metadata = dict[Text, Text | int | float | bool | None]


class CollectionRequest(BaseModel):
    """Body of POST /v1/collections."""

    model_config = ConfigDict(extra="forbid")

    name: NonEmptyText = Field(max_length=200)
    metadata: Metadata = Field(default_factory=dict, max_length=32)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be blank")
        return v.strip()


class DocumentRequest(BaseModel):
    """Body of POST /v1/collections/{id}/documents sent as JSON (a file upload sends the same fields as
    form fields, `metadata` as a JSON object in a string)."""

    model_config = ConfigDict(extra="forbid")

    title: Text | None = Field(None, max_length=500)
    text: Text | None = None  # JSON only; an upload carries a file instead
    content_type: Literal["text/plain", "text/markdown", "text/html"] = "text/plain"
    metadata: Metadata = Field(default_factory=dict, max_length=32)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the document is empty; send some text")
        return v


class SearchParams(BaseModel):
    """The query string of GET /v1/collections/{id}/search."""

    model_config = ConfigDict(extra="forbid")

    q: NonEmptyText = Field(max_length=2000)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    filter: dict[Text, object] | None = None

    @field_validator("q")
    @classmethod
    def _q_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("q must not be blank")
        return v

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_json(cls, v):
        if isinstance(v, str):
            import json

            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError('filter must be a JSON object, e.g. {"lang": "en"}') from None
            if not isinstance(v, dict):
                raise ValueError('filter must be a JSON object, e.g. {"lang": "en"}')
        return v
