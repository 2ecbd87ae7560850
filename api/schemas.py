"""Request and response models of the REST face (pydantic), and the error responses the
OpenAPI document lists. Bounds here are the contract's (DESIGN.md "Outside contract")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from store_bridge.repo import FMVersion, view_name

MAX_ITEM_IDS = 2000  # hard ceiling of the schema; settings.max_candidates may lower it
OCTET = "application/octet-stream"
DTYPES = {"f32": "<f4", "f16": "<f2"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Entity ids are int64 in the store. Request bodies are validated strictly: an id is a JSON
# integer in int64's range, never a string ("3"), a float (3.0, 1e3, NaN, Infinity) or a
# boolean. Negative ids are valid keys (the store and the event schema allow them); they are
# simply never in an FM's vocabulary or history.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# Strict types, and an unknown field is an error rather than silently ignored (a misspelt
# "fromat" or "surfce" would otherwise change the answer without a word).
STRICT = ConfigDict(strict=True, extra="forbid")
# Names (versions, experts, surfaces) are short; a bound keeps a 404 that names an unknown one
# from echoing a huge input back.
MAX_NAME = 128
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
PathName = Annotated[str, PathParam(min_length=1, max_length=MAX_NAME)]


class ErrorBody(BaseModel):
    detail: str


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


E401 = {401: _error("Missing or invalid bearer token (FOUNDEX_READ_TOKEN / FOUNDEX_ADMIN_TOKEN)")}
E413 = {413: _error("Request body too large (FOUNDEX_MAX_BODY_BYTES)")}
E422 = {422: _error("Invalid input: the detail names the field (and index)")}
E503 = {503: _error("Online store unavailable (down, unreachable or timed out)")}
LOOKUP_ERRORS = {
    404: _error("Unknown FM version or expert"),
    409: _error("The repo's files disagree: an expert pins a version the manifest does not "
                "hold, or was trained on another width than the version it pins"),
    **E413, **E422, **E503,
}


class VersionInfo(BaseModel):
    version: str
    dim: int
    status: str
    view: str
    checkpoint_digest: str
    training_window: tuple[str, str]
    ttl_seconds: int
    created_at: str
    # weight sync within the version: the latest published update (null: never synced)
    sync_seq: int | None = None
    sync_time: str | None = None  # ISO-8601 UTC

    @classmethod
    def of(cls, v: FMVersion, sync_seq: int | None = None, sync_time: str | None = None
           ) -> VersionInfo:
        return cls(
            version=v.version,
            dim=v.dim,
            status=v.status,
            view=view_name(v.version),
            checkpoint_digest=v.digest,
            training_window=v.training_window,
            ttl_seconds=v.ttl_seconds,
            created_at=v.created_at,
            sync_seq=sync_seq,
            sync_time=sync_time,
        )


class VersionList(BaseModel):
    versions: list[VersionInfo]


class PublishRequest(BaseModel):
    model_config = STRICT

    checkpoint: str = Field(min_length=1, description="path of an FM checkpoint on the server")
    train_start: str = Field(min_length=1, description="ISO start of the training window")
    train_end: str = Field(min_length=1, description="ISO end of the training window")
    ttl_days: int = Field(default=7, gt=0, le=3650)
    description: str = Field(default="", max_length=500)
    allow_duplicate: bool = Field(
        default=False, description="publish a checkpoint that is already a version again"
    )


class ExpertInfo(BaseModel):
    name: str
    surface: str
    tasks: list[str]
    fm_version: str | None
    item_features: list[str]


class ExpertList(BaseModel):
    experts: list[ExpertInfo]


class LookupRequest(BaseModel):
    model_config = STRICT

    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    fm_version: Name | None = None
    expert: Name | None = None
    format: Literal["json", "f32", "f16"] | None = Field(
        default=None,
        description="json (default), or a raw little-endian float32/float16 matrix [n, dim] "
        "(also chosen by `Accept: application/octet-stream`, as f32)",
    )
    surface: Name | None = Field(
        default=None,
        description="Surface of the request, used when missing TAEs are computed on the fly "
        "(default: the expert's surface, else the FM's first)",
    )

    @model_validator(mode="after")
    def _exactly_one_selector(self) -> LookupRequest:
        if (self.fm_version is None) == (self.expert is None):
            raise ValueError("give exactly one of fm_version or expert")
        return self


class LookupResponse(BaseModel):
    fm_version: str
    dim: int
    embeddings: list[list[float] | None]
    missing: list[int]
    computed: list[int] = Field(
        default=[], description="indices whose TAEs were computed now (read-through)"
    )


class ScoreRequest(BaseModel):
    model_config = STRICT

    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_ITEM_IDS)


class ScoreResponse(BaseModel):
    expert: str
    fm_version: str | None
    tasks: list[str]
    scores: list[list[float]]
    missing_embeddings: list[int] = Field(
        description="indices scored without a TAE (none stored and none computable)"
    )
    computed_embeddings: list[int] = Field(
        default=[], description="indices whose TAEs were computed now (read-through)"
    )


class Health(BaseModel):
    status: str
    detail: str = ""


class RetireResponse(BaseModel):
    version: str
    status: str
    forced: bool
    pinned_by: list[str]


class ReloadResponse(BaseModel):
    experts: list[str]


# --- events (POST /v1/events) -------------------------------------------------------------------

MAX_EVENTS = 10_000  # per request; the body limit (FOUNDEX_MAX_BODY_BYTES) usually binds first


class EventIn(BaseModel):
    """One event in the canonical schema. Documents the row shape only: rows are checked one
    by one by the service (against the dataset spec too), so a bad row is refused alone."""

    model_config = ConfigDict(extra="forbid")

    user_id: Int64
    item_id: Int64
    event_timestamp: str | Int64 = Field(
        description="ISO-8601 time with a zone (2026-01-05T10:00:00Z, ...+08:00), or integer "
        "microseconds since the epoch; a time without a zone is refused. "
        "1970-01-01 .. 2262-04-10 UTC",
    )
    surface: Name = Field(description="one of the dataset spec's surfaces")
    action: int = Field(ge=0, le=32767, description="action id in [0, n_actions) of the spec")
    labels: dict[str, float | None] = Field(
        default={},
        description="{task: value} for tasks of the dataset spec; a task not given (or null) is "
        "NaN; a name that is not a task of the spec is refused, and so is an infinite value",
    )
    request_id: Int64 = Field(default=0, description="impressions shown together share one")
    event_id: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="the client's id for the event (not starting with 'c-'); absent, one is "
        "derived from (user, item, time, surface, action), so the same event sent twice gets "
        "the same id. An id seen within FOUNDEX_EVENT_DEDUP_S seconds is a duplicate: "
        "accepted, not appended again",
    )  # fmt: skip
    hour: int | None = Field(
        default=None, description="ignored: derived from event_timestamp in the spec's time zone"
    )


_EVENTS_SCHEMA = {"type": "array", "items": EventIn.model_json_schema(), "minItems": 1,
                  "maxItems": MAX_EVENTS}  # fmt: skip


class EventsRequest(BaseModel):
    model_config = STRICT

    # Rows are not validated here as a whole (one bad row would refuse the batch): the
    # service checks each and refuses only the bad ones. The document shows EventIn.
    events: Annotated[list[Any], WithJsonSchema(_EVENTS_SCHEMA)] = Field(
        min_length=1, max_length=MAX_EVENTS
    )


class EventsResponse(BaseModel):
    accepted: int = Field(
        description="events taken in: appended now, or already in the stream (duplicates)"
    )
    duplicates: int = Field(
        description="accepted events the stream already held (same id within the dedup "
        "window, or repeated in this batch): not appended again"
    )
    event_ids: list[str] = Field(description="the id of each accepted event, in input order")


EVENTS_422 = (
    "Invalid input. For a batch whose rows are objects, the VALID ROWS ARE ACCEPTED and the "
    "body adds to `detail` (one line naming the first bad rows and fields, then a count) the "
    "fields of a 200 answer (`accepted`, `duplicates`, `event_ids` of the accepted rows) and "
    "`rejected`: [{`row` (0-based index in `events`), `field`, `message`}], one per refused "
    "row. A body that is not `{\"events\": [...]}` is refused as a whole (`detail` only)."
)
