"""The wire formats: pydantic models of every request and answer body, and their JSON encoding.

Compatibility beats strictness (docs/design.md, "Server"). The request
models declare every field the reference API (OpenAI's completions,
llama.cpp's ``/infill``) defines; the ones ponder has no use for are
accepted, ignored and marked ``x-ponder: ignored`` in the OpenAPI document,
which is generated from these same models (``openapi.py``). Any other field,
or a wrong type, is a 400 naming the field. What the reference accepts,
ponder accepts: an empty prompt or ``input_prefix``, ``n_predict: 0``
(ingest only), ``-1`` or an ``n_predict`` above the server's limit.

ponder's own figures (λ per chunk, chunks updated and skipped, TTT FLOPs,
the session) ride along under a ``ponder`` key that clients of those APIs
ignore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.responses import Response

from ponder.server.sessions import MAX_ID_CHARS

if TYPE_CHECKING:
    from ponder.server.service import Final, TextDelta

INT64 = 1 << 63
INT32 = 1 << 31


# --- Request models.


def _ignored(api: str) -> Any:
    """A field ``api`` defines that ponder accepts and ignores (flagged in the OpenAPI document)."""
    return Field(None, description=f"{api} field, accepted and ignored.", json_schema_extra={"x-ponder": "ignored"})


# ponder's session fields, the same in both APIs.
SessionId = Annotated[str | None, Field(
    max_length=MAX_ID_CHARS, description="ponder: the editor document's session (absent: one of the key's anonymous sessions, "
    "matched by common prefix)."
)]
DocumentId = Annotated[str | None, Field(max_length=MAX_ID_CHARS, description="ponder: a new document id resets the session.")]
# The sampling controls both APIs share (docs/design.md, "Sampling"); ranges are checked by the service.
MinP = Annotated[float, Field(
    description="Drop tokens whose probability is below min_p times the likeliest token's, in [0, 1]; 0: off."
)]
PresencePenalty = Annotated[float, Field(description="Subtracted once from the logit of every token counted, in [-2, 2].")]
FrequencyPenalty = Annotated[float, Field(
    description="Subtracted from a token's logit once for every time it is counted, in [-2, 2]."
)]
UpdateRate = Annotated[float | None, Field(
    description="ponder: the session's target update rate from this request on, in [0, 1] (the share of chunks whose "
    "fast weights update), under a budgeted schedule; absent: the session's last one, or the server's --schedule-rate."
)]


class RequestBody(BaseModel):
    """A request body: unknown fields and wrong types are errors (strict JSON types, no coercion).

    ``null`` stands for a field's default, as both reference APIs read it. An
    integer field takes a number with no fractional part (``16.0``), which JSON
    Schema counts as an integer.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if not isinstance(data, dict):
            return data
        ints = {name for name, field in cls.model_fields.items() if field.annotation is int}
        whole = lambda k, v: k in ints and isinstance(v, float) and v.is_integer()
        return {k: int(v) if whole(k, v) else v for k, v in data.items() if v is not None}

    @classmethod
    def ignored_fields(cls) -> list[str]:
        return [name for name, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("x-ponder") == "ignored"]


class StreamOptions(RequestBody):
    include_usage: bool = Field(False, description="End the stream with a chunk holding `usage` and no choices.")
    include_obfuscation: Any = _ignored("OpenAI")


class CompletionBody(RequestBody):
    """``POST /v1/completions``: OpenAI's legacy completion request, plus ponder's session fields."""

    prompt: str | list[str] = Field(
        "", description="The document up to the cursor: a string, or a list of exactly one string. Empty is valid."
    )
    suffix: str | None = Field(None, description="The document after the cursor: fill-in-the-middle.")
    max_tokens: int = Field(16, description="Most tokens to generate; 0 only updates the session.")
    temperature: float = Field(0.0, description="Sampling temperature; 0 is greedy (ponder's default, unlike OpenAI's).")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, lt=INT32, description="Sample among the k likeliest tokens (0: all); an extension, as in vLLM.")
    stop: str | list[str] = Field([], description="Generation ends before the first occurrence of any of these.")
    seed: int = Field(0, ge=-INT64, lt=INT64, description="Seed of the sampler; equal seeds give equal samples.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Put the prompt before the completion in the answer.")
    n: int = Field(1, description="Completions per request: ponder returns one, so only 1 is allowed.")
    presence_penalty: PresencePenalty = 0.0  # OpenAI's: counts the tokens this completion generated
    frequency_penalty: FrequencyPenalty = 0.0
    repetition_penalty: float = Field(
        1.0, description="vLLM: the logit of a token in the prompt or the completion (their last context window) is "
        "divided by this if positive, multiplied if negative; > 0, 1: off."
    )
    min_p: MinP = 0.0
    session_id: SessionId = None
    document_id: DocumentId = None
    update_rate: UpdateRate = None
    model: Any = _ignored("OpenAI")
    best_of: Any = _ignored("OpenAI")
    logprobs: Any = _ignored("OpenAI")
    logit_bias: Any = _ignored("OpenAI")
    user: Any = _ignored("OpenAI")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value):
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise pydantic_core.PydanticCustomError(
                "token_prompt", "token-id prompts are not supported: send the prompt as text (a string, or a list of one string)"
            )
        return value


class InfillExtra(BaseModel):
    """A snippet of another file. Unknown keys (llama.vim sends ``time``) are ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="ignore", strict=True)
    filename: str | None = None
    text: str


class InfillBody(RequestBody):
    """``POST /infill``: llama.cpp's fill-in-the-middle request, plus ponder's session fields."""

    input_prefix: str = Field("", description="The document before the cursor. Empty is valid.")
    input_suffix: str = Field("", description="The document after the cursor.")
    input_extra: list[InfillExtra] = Field([], description="Snippets of other files: context for this request only.")
    prompt: str = Field("", description="Text at the cursor, after `input_prefix` (as llama.cpp places it).")
    n_predict: int = Field(
        -1, description="Most tokens to generate: -1, or more than the server's limit, means the limit; 0 only updates the session."
    )
    t_max_predict_ms: int = Field(
        -1, lt=INT32, description="Generation time limit in ms, as llama.cpp's: once more than this has passed since the "
        "first generated token, generation stops (`stop_type: limit`) at the next token whose text holds a newline; "
        "<= 0 means none.",
    )
    n_indent: int = Field(0, description="After the first newline, a line indented by fewer spaces/tabs ends the completion.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    temperature: float = Field(0.0, description="Sampling temperature; <= 0 is greedy (ponder's default, unlike llama.cpp's).")
    top_k: int = Field(0, lt=INT32, description="Sample among the k likeliest tokens (<= 0: all).")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    seed: int = Field(0, ge=-INT64, lt=INT64, description="Seed of the sampler; equal seeds give equal samples.")
    stop: str | list[str] = Field([], description="Generation ends before the first occurrence of any of these.")
    return_tokens: bool = Field(False, description="Include the generated token ids in `tokens`.")
    response_fields: list[str] | None = Field(
        None, description="Keep only these fields of the final answer; `a/b` names a nested field (key `a/b` in the answer); "
        "absent or empty: every field."
    )
    min_p: MinP = 0.0
    repeat_penalty: float = Field(
        1.0, description="The logit of a token among the last `repeat_last_n` is divided by this if positive, "
        "multiplied if not; > 0, 1: off."
    )
    repeat_last_n: int = Field(
        64, ge=-INT32, lt=INT32, description="Tokens (prompt and generated) the penalties look back; -1: the context "
        "window; 0: no penalties."
    )
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    samplers: list[str] | str | None = Field(
        None, description="llama.cpp's sampler chain, as names or letters: a control whose sampler it leaves out is off "
        "(`penalties`/`e`, `top_k`/`k`, `top_p`/`p`, `min_p`/`m`); the order is always llama.cpp's default, "
        "temperature always applies, other samplers are ignored."
    )
    session_id: SessionId = None
    document_id: DocumentId = None
    update_rate: UpdateRate = None
    id_slot: Any = _ignored("llama.cpp")
    cache_prompt: Any = _ignored("llama.cpp")
    t_max_prompt_ms: Any = Field(None, description="llama.cpp field, accepted and ignored: llama.cpp declares it "
                                 "and does not implement it either.", json_schema_extra={"x-ponder": "ignored"})
    n_probs: Any = _ignored("llama.cpp")
    typical_p: Any = _ignored("llama.cpp")
    dry_multiplier: Any = _ignored("llama.cpp")
    dry_base: Any = _ignored("llama.cpp")
    dry_allowed_length: Any = _ignored("llama.cpp")
    dry_penalty_last_n: Any = _ignored("llama.cpp")
    dry_sequence_breakers: Any = _ignored("llama.cpp")
    xtc_probability: Any = _ignored("llama.cpp")
    xtc_threshold: Any = _ignored("llama.cpp")
    top_n_sigma: Any = _ignored("llama.cpp")
    mirostat: Any = _ignored("llama.cpp")
    mirostat_tau: Any = _ignored("llama.cpp")
    mirostat_eta: Any = _ignored("llama.cpp")
    dynatemp_range: Any = _ignored("llama.cpp")
    dynatemp_exponent: Any = _ignored("llama.cpp")
    min_keep: Any = _ignored("llama.cpp")
    n_keep: Any = _ignored("llama.cpp")
    n_discard: Any = _ignored("llama.cpp")
    ignore_eos: Any = _ignored("llama.cpp")
    logit_bias: Any = _ignored("llama.cpp")
    grammar: Any = _ignored("llama.cpp")
    json_schema: Any = _ignored("llama.cpp")
    timings_per_token: Any = _ignored("llama.cpp")
    post_sampling_probs: Any = _ignored("llama.cpp")
    lora: Any = _ignored("llama.cpp")
    model: Any = _ignored("llama.cpp")


# llama.cpp's names (a list) and letters (a string) of the samplers ponder implements
# (common_sampler_types_from_names, with its alternative names, and common_sampler_types_from_chars).
_SAMPLER_NAMES = {"penalties": "penalties", "top_k": "top_k", "top-k": "top_k", "top_p": "top_p", "top-p": "top_p",
                  "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p"}
_SAMPLER_LETTERS = {"e": "penalties", "k": "top_k", "p": "top_p", "m": "min_p"}


def enabled_samplers(samplers: list[str] | str | None) -> set[str]:
    """Which of ponder's controls llama.cpp's ``samplers`` leaves on (absent: all, as llama.cpp's default chain)."""
    if samplers is None:
        return set(_SAMPLER_NAMES.values())
    table = _SAMPLER_LETTERS if isinstance(samplers, str) else _SAMPLER_NAMES
    return {table[name] for name in samplers if name in table}


def stop_sequences(stop: str | list[str]) -> tuple[str, ...]:
    """``stop`` as both APIs send it (one string or a list) in the service's form."""
    return (stop,) if isinstance(stop, str) else tuple(stop)


# --- Response models.


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PonderDelta(_Answer):
    chunk_lambda: list[float] = Field(description="λ of the TTT chunks that closed since the last event.")
    tokens: int = Field(description="Generated tokens behind this event (a reader that fell behind gets several per event).")

    @classmethod
    def of(cls, delta: TextDelta) -> PonderDelta:
        return cls(chunk_lambda=delta.chunk_lambda, tokens=len(delta.token_ids))


class PonderFinal(_Answer):
    session_id: str = Field(description="The session the request ran in (send it back to keep the document's state).")
    finish_reason: Literal["stop", "length", "cancelled", "deadline"] = Field(
        description="ponder's own reason: `cancelled` (superseded) and `deadline` show as `length`."
    )
    chunk_lambda: list[float] = Field(description="λ of every chunk the TTT layer closed for this request.")
    chunks_updated: int
    chunks_skipped: int
    ttt_flops: float
    cached_tokens: int = Field(description="Prompt tokens served from the session's committed state.")
    reencoded_tokens: int = Field(description="Earlier tokens the base re-read to move its attention window (no TTT).")

    @classmethod
    def of(cls, final: Final) -> PonderFinal:
        u = final.usage
        return cls(
            session_id=final.session_id, finish_reason=final.finish_reason, chunk_lambda=final.chunk_lambda,
            chunks_updated=u.chunks_updated, chunks_skipped=u.chunks_skipped, ttt_flops=u.ttt_flops,
            cached_tokens=u.cached_tokens, reencoded_tokens=u.reencoded_tokens,
        )


class CompletionUsage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, final: Final) -> CompletionUsage:
        u = final.usage
        total = u.prompt_tokens + u.generated_tokens
        return cls(prompt_tokens=u.prompt_tokens, completion_tokens=u.generated_tokens, total_tokens=total)


class CompletionChoice(_Answer):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Answer):
    """A completion, or (streaming) one event of it: OpenAI's ``text_completion`` object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    ponder: PonderFinal | PonderDelta | None = None


class InfillTimings(_Answer):
    """llama.cpp's ``timings``: the prompt phase, then the generation phase."""

    cache_n: int = Field(description="Prompt tokens reused from the session.")
    prompt_n: int = Field(description="Prompt tokens computed for this request.")
    prompt_ms: float = Field(description="From the request's start in a slot (queueing not counted) to its first token.")
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float = Field(description="From the first token to the end.")
    predicted_per_token_ms: float
    predicted_per_second: float


class InfillChunk(_Answer):
    """One streamed event of ``/infill`` before the last."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: Literal[False] = False
    tokens_predicted: int
    ponder: PonderDelta


class Infill(_Answer):
    """llama.cpp's final ``/infill`` answer (with ``stream``, the last event, its ``content`` empty)."""

    index: int = 0
    content: str
    tokens: list[int] = Field(description="Generated token ids when `return_tokens` is set.")
    stop: Literal[True] = True
    model: str
    stop_type: Literal["eos", "word", "limit"]
    stopping_word: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int = Field(description="Tokens in the request's context when it ended (llama.cpp's n_past): the prompt "
                               "tokens reused or computed, and the generated tokens fed back.")
    truncated: bool = Field(description="The context no longer held the document's start: the base's attention window had "
                            "moved past it (the fast weights still read it).")
    has_new_line: bool
    timings: InfillTimings
    ponder: PonderFinal


class ModelCard(_Answer):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ponder"


class ModelList(_Answer):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionReset(_Answer):
    session_id: str
    existed: bool


class Health(_Answer):
    status: Literal["ok", "loading", "draining"]


class ErrorDetail(_Answer):
    message: str
    type: str
    param: str | None = None
    code: int = Field(description="The HTTP status.")


class ErrorAnswer(_Answer):
    """OpenAI's error shape (llama.cpp's is the same without ``param``)."""

    error: ErrorDetail


# --- Encoding.


def to_json(data: BaseModel | dict) -> bytes:
    """An answer model, or a dict already dumped from one (``/infill``'s filtered answer), as JSON."""
    if isinstance(data, BaseModel):
        return data.model_dump_json().encode()
    return pydantic_core.to_json(data, inf_nan_mode="null")


def json_response(data: BaseModel | dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(to_json(data), status, headers, media_type="application/json")
