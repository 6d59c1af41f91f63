"""What a server refuses in a request body beyond the wire models' types, stated in its OpenAPI document.

The wire models (``wire.py``) declare types; the ranges are checked further
in: sampling controls by ``ponder.model.sampling.Sampling``, ``max_tokens``
and stop sequences by the service's limits, ``update_rate`` by the engine's
schedule. A document that leaves them out promises that a 400 will never
come for a body that matches it; so ``constrain`` writes them into the
request schemas, from the server's own settings (``ServedLimits``) where
they are settings. ``tests/test_schema_fuzz.py`` holds the two sides
together: just past each documented bound the server answers 400 naming the
field, at the bound it answers 200. Both reference APIs read ``null`` as a
field's default, and so does ponder (``wire.RequestBody``): the document
allows it for every field.
"""

from __future__ import annotations

import dataclasses

from ponder.model.sampling import RANGES

# The ranges ``Sampling`` checks, by field as the endpoints pass them on (vLLM's ``repetition_penalty`` is
# llama.cpp's ``repeat_penalty``).
SAMPLING = {**RANGES, "repetition_penalty": RANGES["repeat_penalty"]}
# llama.cpp's readings on /infill (``llama.py``): a negative temperature is greedy, any top_k <= 0 keeps every token.
INFILL_READINGS = {"temperature": {"maximum": 100}, "top_k": {}}
_META = ("title", "description", "default", "x-ponder", "examples")


@dataclasses.dataclass(frozen=True)
class ServedLimits:
    """The settings of a server that bound a request.

    Attributes:
      max_tokens: most tokens one request may generate (``--max-tokens``).
      update_rate: whether the server's schedule reads a budget; if not, ``update_rate`` is refused.
      max_stop, max_stop_chars: most stop sequences, and characters in each (``service.Limits``).
    """

    max_tokens: int
    update_rate: bool
    max_stop: int
    max_stop_chars: int


def bounds(body: str, limits: ServedLimits) -> dict[str, dict[str, dict]]:
    """Field -> JSON type -> the keywords that bound a value of that type, for request body ``body``."""
    stop_text = {"minLength": 1, "maxLength": limits.max_stop_chars}
    numbers = {**SAMPLING, **(INFILL_READINGS if body == "InfillBody" else {})}
    found = {name: {"number": keywords} for name, keywords in numbers.items()}
    found["stop"] = {"string": stop_text, "array": {"maxItems": limits.max_stop, "items": {"type": "string", **stop_text}}}
    found["update_rate"] = {"number": {"minimum": 0, "maximum": 1}}
    if body == "CompletionBody":
        found["prompt"] = {"array": {"minItems": 1, "maxItems": 1}}  # one prompt per request
        found["max_tokens"] = {"number": {"minimum": 0, "maximum": limits.max_tokens}}
        found["n"] = {"number": {"minimum": 1, "maximum": 1}}
    return found


def constrain(components: dict, bodies: list[str], limits: ServedLimits) -> None:
    """Writes the bounds of each request model named in ``bodies`` (and null, for every field) into ``components``."""
    for body in bodies:
        properties = components[body]["properties"]
        for name, by_type in bounds(body, limits).items():
            if name in properties:
                _bound(properties[name], by_type)
        if not limits.update_rate and "update_rate" in properties:
            properties["update_rate"] = {
                "type": "null", "description": "ponder: this server's schedule reads no budget, so it takes no update_rate "
                "(serve a budgeted --schedule for one)."
            }
        for name, schema in properties.items():
            properties[name] = _nullable(schema)


def _bound(schema: dict, by_type: dict[str, dict]) -> None:
    """Adds ``by_type[t]`` to each branch of ``schema`` of JSON type t (integer branches take the number bounds)."""
    for branch in schema.get("anyOf", [schema]):
        kind = branch.get("type")
        keywords = by_type.get(kind, by_type.get("number") if kind == "integer" else None)
        if keywords:
            branch.update(keywords)


def _nullable(schema: dict) -> dict:
    """``schema`` that also allows null (a field's default), unless it does already (or allows anything)."""
    meta = {k: v for k, v in schema.items() if k in _META}
    rest = {k: v for k, v in schema.items() if k not in _META}
    branches = rest.get("anyOf", [rest])
    if not rest or any(b.get("type") == "null" or b == {} for b in branches):
        return schema
    return {"anyOf": [*(branches if set(rest) == {"anyOf"} else [rest]), {"type": "null"}], **meta}
