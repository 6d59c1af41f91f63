"""``POST /infill``: llama.cpp's fill-in-the-middle API as an adapter onto the completion service.

The body becomes a ``CompletionRequest`` with llama.cpp's readings of its
values (``n_predict`` -1 or past the server's limit is the limit, a negative
temperature is greedy, ``top_k <= 0`` keeps every token, the sampling
controls in llama.cpp's chain order with ``samplers`` turning off the ones
it leaves out: docs/design.md, "Sampling"); the answer is
llama.cpp's (``content`` / ``stop`` / ``stop_type`` / ``timings``), filtered
by ``response_fields``. With ``stream``, ``data:`` events with ``stop: false``
precede the final answer, whose ``content`` is then empty.

The figures mean what llama.cpp's server means by them (its ``server_slot``):
``timings.cache_n`` prompt tokens reused from the session, ``prompt_n`` prompt
tokens computed, ``prompt_ms`` the prompt phase from the job's start in a
slot to its first token, ``predicted_*`` the generation from the first token
to the end, ``tokens_cached`` the tokens in the request's context when it
ended (``n_past``), ``truncated`` whether the context no longer held the
document's start (here: the base's attention window had moved on). They come
from the engine (``server.types.Usage``), also for a request cut short.
``t_max_predict_ms`` is llama.cpp's generation time limit (see
``server.service``); ``t_max_prompt_ms`` is accepted and ignored, as
llama.cpp itself declares it and does not implement it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ponder.model.sampling import Sampling
from ponder.server.http import streaming
from ponder.server.http.streaming import CompletionEndpoint, sse_event
from ponder.server.http.wire import (
    Infill,
    InfillBody,
    InfillChunk,
    InfillTimings,
    PonderDelta,
    PonderFinal,
    enabled_samplers,
    json_response,
    stop_sequences,
)
from ponder.server.metrics import RequestRecord
from ponder.server.service import CompletionRequest, Final, TextDelta
from ponder.server.types import Usage


class LlamaServing(CompletionEndpoint):
    """The llama.cpp-compatible endpoint."""

    async def infill(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        """``POST /infill`` (an ``InfillBody``): the ``Infill`` answer as JSON, or with ``stream``
        ``InfillChunk`` events and then it."""
        body = await self.read_body(request, InfillBody)
        limit = self.service.max_new_tokens
        n_predict = limit if body.n_predict < 0 or body.n_predict > limit else body.n_predict  # llama.cpp clamps to the server's
        budget = body.t_max_predict_ms
        on = enabled_samplers(body.samplers)
        completion = CompletionRequest(
            prompt=body.input_prefix + body.prompt,
            suffix=body.input_suffix,
            extra=tuple((chunk.filename or "", chunk.text) for chunk in body.input_extra),
            max_tokens=n_predict,
            sampling=Sampling(
                temperature=0.0 if body.temperature < 0 else body.temperature,  # llama.cpp: negative is greedy
                top_p=body.top_p if "top_p" in on else 1.0,
                top_k=max(body.top_k, 0) if "top_k" in on else 0,  # llama.cpp: <= 0 keeps every token
                min_p=body.min_p if "min_p" in on else 0.0,
                repeat_penalty=body.repeat_penalty,
                repeat_last_n=body.repeat_last_n if "penalties" in on else 0,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                temperature_last=True,  # llama.cpp's chain: penalties, top-k, top-p, min-p, then temperature
                seed=body.seed,
            ),
            stop=stop_sequences(body.stop),
            n_indent=max(body.n_indent, 0),
            session_id=body.session_id or None,
            document_id=body.document_id or None,
            update_rate=body.update_rate,
            generation_budget_s=budget / 1000 if budget > 0 and n_predict > 0 else None,
            api_key=api_key,
            field_names=(("prompt", "input_prefix"), ("suffix", "input_suffix"), ("max_tokens", "n_predict")),
        )
        items = await self.start(request, completion, call)
        if not body.stream:
            final = await streaming.final(request, items)
            return json_response(self._answer(body, final, final.text))
        predicted = 0

        def render(item: TextDelta | Final) -> list[bytes]:
            nonlocal predicted
            if isinstance(item, Final):
                return [sse_event(self._answer(body, item, ""))]
            predicted += len(item.token_ids)
            tokens = item.token_ids if body.return_tokens else []
            chunk = InfillChunk(content=item.text, tokens=tokens, tokens_predicted=predicted, ponder=PonderDelta.of(item))
            return [sse_event(chunk)]

        return streaming.event_stream(items, call, render)

    def _answer(self, body: InfillBody, final: Final, content: str) -> dict:
        """llama.cpp's final answer, filtered by ``response_fields``."""
        u = final.usage
        word = final.stop_sequence
        stop_type = ("word" if word else "eos") if final.finish_reason == "stop" else "limit"
        answer = Infill(
            content=content, tokens=final.token_ids if body.return_tokens else [], model=self.config.model_name,
            stop_type=stop_type, stopping_word=word, tokens_predicted=u.generated_tokens, tokens_evaluated=u.prompt_tokens,
            tokens_cached=u.context_tokens, truncated=u.truncated, has_new_line="\n" in final.text, timings=_timings(u),
            ponder=PonderFinal.of(final),
        ).model_dump(mode="json")
        return _pick_fields(answer, body.response_fields) if body.response_fields else answer  # []: all, as llama.cpp


def _timings(u: Usage) -> InfillTimings:
    """llama.cpp's ``timings`` (its ``server_slot::get_timings``) from the engine's figures."""
    prompt_n, prompt_ms = u.computed_tokens, u.prompt_s * 1000
    predicted_n, predicted_ms = u.generated_tokens, u.generation_s * 1000
    return InfillTimings(
        cache_n=u.cached_tokens,
        prompt_n=prompt_n, prompt_ms=prompt_ms,
        prompt_per_token_ms=_ratio(prompt_ms, prompt_n), prompt_per_second=_ratio(1000 * prompt_n, prompt_ms),
        predicted_n=predicted_n, predicted_ms=predicted_ms,
        predicted_per_token_ms=_ratio(predicted_ms, predicted_n),
        predicted_per_second=_ratio(1000 * predicted_n, predicted_ms),
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _pick_fields(answer: dict, paths: list[str]) -> dict:
    """llama.cpp's ``response_fields``: only the listed fields, a nested one named by its ``a/b`` path
    (and keyed by that path in the result); paths that name nothing are left out."""
    picked = {}
    for path in paths:
        value, found = answer, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            picked[path] = value
    return picked

