"""``POST /v1/completions``: OpenAI's (legacy) completions API as an adapter onto the completion service.

The body becomes a ``CompletionRequest``; what the service yields becomes
one ``text_completion`` object, or with ``stream`` SSE ``data:`` events of
them ending in ``data: [DONE]`` (and a ``usage`` event before it when
``stream_options.include_usage`` asks). ``suffix`` makes it fill-in-the-middle.
The penalties follow OpenAI (presence and frequency count the completion's
tokens) and vLLM (``repetition_penalty`` reads prompt and completion):
docs/design.md, "Sampling".
"""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from ponder.model.sampling import Sampling
from ponder.server.http import streaming
from ponder.server.http.errors import ApiError
from ponder.server.http.streaming import CompletionEndpoint, sse_event
from ponder.server.http.wire import (
    Completion,
    CompletionBody,
    CompletionChoice,
    CompletionUsage,
    PonderDelta,
    PonderFinal,
    json_response,
    stop_sequences,
)
from ponder.server.metrics import RequestRecord
from ponder.server.service import CompletionRequest, Final, TextDelta


class OpenAIServing(CompletionEndpoint):
    """The OpenAI-compatible endpoint."""

    async def completions(self, request: Request, api_key: str, call: RequestRecord) -> Response:
        """``POST /v1/completions`` (a ``CompletionBody``): a ``Completion`` as JSON, or with ``stream`` its events."""
        body = await self.read_body(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                message = f"prompt: send one prompt (a string or a list of one string), got a list of {len(prompt)}"
                raise ApiError(400, message, "prompt")
            prompt = prompt[0]
        if body.n != 1:
            raise ApiError(400, f"n: ponder returns one completion per request; send n=1 or leave it out (got {body.n})", "n")
        completion = CompletionRequest(
            prompt=prompt,
            suffix=body.suffix,
            max_tokens=body.max_tokens,
            sampling=Sampling(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                # vLLM's repetition penalty reads the prompt and the completion; OpenAI's presence and frequency
                # penalties count what the completion generated ("how often the token was sampled").
                repeat_penalty=body.repetition_penalty,
                repeat_last_n=-1,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                penalty_scope="generated",
                seed=body.seed,
            ),
            stop=stop_sequences(body.stop),
            session_id=body.session_id or None,
            document_id=body.document_id or None,
            update_rate=body.update_rate,
            api_key=api_key,
            field_names=(("repeat_penalty", "repetition_penalty"),),
        )
        items = await self.start(request, completion, call)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.model_name}
        echo = prompt if body.echo else ""
        if not body.stream:
            final = await streaming.final(request, items)
            choice = CompletionChoice(text=echo + final.text, finish_reason=_finish_reason(final))
            return json_response(
                Completion(**head, choices=[choice], usage=CompletionUsage.of(final), ponder=PonderFinal.of(final))
            )
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        unsent_echo = [echo] if echo else []

        def render(item: TextDelta | Final) -> list[bytes]:
            events = []
            if unsent_echo:  # the echoed prompt goes first, in an event of its own
                events.append(sse_event(Completion(**head, choices=[CompletionChoice(text=unsent_echo.pop())])))
            if isinstance(item, TextDelta):
                choice = CompletionChoice(text=item.text)
                return events + [sse_event(Completion(**head, choices=[choice], ponder=PonderDelta.of(item)))]
            finish = CompletionChoice(text="", finish_reason=_finish_reason(item))
            events.append(sse_event(Completion(**head, choices=[finish], ponder=PonderFinal.of(item))))
            if include_usage:
                events.append(sse_event(Completion(**head, choices=[], usage=CompletionUsage.of(item))))
            return events + [b"data: [DONE]\n\n"]

        return streaming.event_stream(items, call, render)


def _finish_reason(final: Final) -> str:
    """OpenAI knows ``stop`` and ``length``: a cancelled or timed-out completion is cut short, like ``length``."""
    return "stop" if final.finish_reason == "stop" else "length"
