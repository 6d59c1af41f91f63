"""The HTTP front end: OpenAI's and llama.cpp's completion APIs as a thin adapter onto the completion service.

Every endpoint parses its wire format into the shared ``CompletionRequest``
and renders what ``CompletionService.stream`` yields (text deltas, then one
``Final``) back into that API's shapes: ``POST /v1/completions`` as OpenAI
answers it, ``POST /infill`` as llama.cpp's server does. ponder's own
figures ride along under a ``ponder`` key that clients of those APIs ignore.

The modules, one concern each:

- ``wire``: the pydantic models of every body, and their JSON encoding;
- ``errors``: ``ApiError`` and the request-body checks (size, UTF-8, JSON, fields);
- ``streaming``: running a completion for a client: disconnects, server-sent events;
- ``openai`` / ``llama``: each API's handler;
- ``openapi``: the endpoint table and the OpenAPI document generated from it;
- ``app``: ``build_app``: routes, auth, failures to answers, the small endpoints;
- ``config``: ``HttpConfig``, the settings ``ponder serve`` passes in.

The package itself imports nothing: ``ponder serve`` builds the app with
``ponder.server.http.app.build_app``.
"""
