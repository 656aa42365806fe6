"""The server's request checks: ASGI middleware in front of llama-cpp-python's routes (see serve.py).

A request to a generating route is read whole, checked, and either answered here with a 400 in OpenAI's
error shape ({"error": {"message", "type": "invalid_request_error", "param", "code"}}) or passed on with its
"model" set to the served model's id, so that every response names the model that answered it (llama.cpp's
server answers a request naming another model with its own; llama-cpp-python would echo the request's name,
or a file path when the request names none).
"""

from __future__ import annotations

import json

Problem = tuple[str, "str | None", "str | None"]  # (message, code, param)


class RequestChecks:
    """ASGI middleware: the checks below for POSTs to the routes in `_request_types()`, passed through
    unchanged when the API key is wrong (the route answers 401)."""

    def __init__(self, app, *, llm, api_key: str | None, model_id: str):
        self.app, self.llm, self.api_key, self.model_id = app, llm, api_key, model_id
        self.request_types = _request_types()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request_type = self.request_types.get(scope["path"].rstrip("/"))
        if request_type is None or not self._authorized(scope):
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        if raw is None:  # the client went away
            return
        body, problem = check_request(self.llm, request_type, raw)
        if problem is not None:
            from fastapi.responses import JSONResponse

            message, code, param = problem
            response = JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                               "code": code}}, status_code=400)
            return await response(scope, receive, send)
        data = json.dumps(dict(body, model=self.model_id)).encode("utf-8")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode("ascii")))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # the disconnect, while a response streams

        await self.app(dict(scope, headers=headers), replay, send)

    def _authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        return (scheme.lower(), key) == ("bearer", self.api_key)


def _request_types() -> dict:
    from llama_cpp.server import types

    return {
        "/v1/completions": types.CreateCompletionRequest,
        "/v1/engines/copilot-codex/completions": types.CreateCompletionRequest,
        "/v1/chat/completions": types.CreateChatCompletionRequest,
        "/v1/embeddings": types.CreateEmbeddingRequest,
        "/extras/tokenize": types.TokenizeInputRequest,
        "/extras/tokenize/count": types.TokenizeInputRequest,
        "/extras/detokenize": types.DetokenizeInputRequest,
    }


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_request(llm, request_type, raw: bytes) -> tuple[dict | None, Problem | None]:
    """(the parsed body, None) for a request the route can serve, else (None, the problem).

    llama-cpp-python's route wrapper answers a body that is not JSON, or does not match the request type,
    with a 500 (its error path parses the body again); an empty prompt reaches an assert (500); a grammar
    llama.cpp cannot parse kills the process (a NULL sampler is added to the chain); parameters out of
    OpenAI's ranges are taken without complaint (a max_tokens below 1 means "until the context is full");
    and a streamed request that fails the context check fails after its 200 is out. So those are checked
    here, with the same types.
    """
    from pydantic import ValidationError

    try:
        body = json.loads(raw)
        problem = _check_params(request_type, body) if isinstance(body, dict) else None
        if problem is None:
            request = request_type.model_validate(body)
            problem = _check_body(llm, request, body)
    except ValidationError as e:  # a ValueError too: first
        first = e.errors()[0]["loc"]
        return None, ("; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()),
                      None, str(first[0]) if first else None)
    except ValueError as e:  # UnicodeDecodeError included
        return None, (f"the request body is not valid JSON: {e}", None, None)
    return (None, problem) if problem is not None else (body, None)


def _check_params(request_type, body: dict) -> Problem | None:
    """OpenAI's ranges (and messages) for the sampling parameters llama-cpp-python takes unchecked."""
    fields = request_type.model_fields

    def number(name):
        value = body.get(name)
        return value if name in fields and isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if (v := number("max_tokens")) is not None and v < 1:
        return (f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got {v} instead.",
                "integer_below_min_value", "max_tokens")
    if (v := number("temperature")) is not None and v < 0:
        return (f"Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got {v} instead.",
                "decimal_below_min_value", "temperature")
    if (v := number("top_p")) is not None and not 0 < v <= 1:
        return (f"Invalid 'top_p': expected a value above 0 and at most 1, but got {v} instead.", "invalid_value",
                "top_p")
    for name in ("n", "best_of"):
        if (v := number(name)) is not None and v != 1:
            return (f"Invalid '{name}': this server returns one choice per request, so {name} must be 1, "
                    f"but got {v} instead.", "unsupported_value", name)
    return None


def _check_body(llm, request, body: dict) -> Problem | None:
    """The problem with a well-typed request that cannot be served, else None."""
    from llama_cpp.server import types

    if isinstance(request, types.CreateChatCompletionRequest):
        if not body.get("messages"):  # upstream's default is [], which would chat about nothing
            return "messages must hold at least one message", None, "messages"
        if request.logprobs and request.top_logprobs is not None and not llm.llama._logits_all:
            return "logprobs are not computed by this server", "unsupported_value", "logprobs"
    elif isinstance(request, types.CreateCompletionRequest):
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) > 1:
                return "one prompt per request", None, "prompt"
            prompt = prompt[0] if prompt else None
        if not prompt or not llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True):
            return "prompt is required and must not be empty", None, "prompt"
        if request.logprobs is not None and not llm.llama._logits_all:
            return "logprobs are not computed by this server", "unsupported_value", "logprobs"
    else:
        return None
    if body.get("grammar") is not None and not _grammar_parses(llm, body["grammar"]):
        return "llama.cpp cannot parse the grammar (it needs a 'root' rule)", None, "grammar"
    if body.get("stream") is True:
        return _stream_over_context(llm, request)
    return None


def _grammar_parses(llm, grammar: str) -> bool:
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm.llama._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _stream_over_context(llm, request) -> Problem | None:
    """The error for a streamed request whose prompt alone does not fit the context, else None.

    A prompt that fits, with a max_tokens that does not, is served: llama-cpp-python clamps max_tokens to the
    room left (Llama._create_completion), as llama.cpp's server does (it stops at the end of the context with
    finish_reason "length": "stopped due to running out of context capacity" in server-context.cpp). Only a
    prompt with no room left fails, and for a stream it would fail after the 200, so it is caught here.
    """
    n_ctx = llm.n_ctx()
    if hasattr(request, "messages"):
        tokens = chat_prompt_tokens(llm.llama, request)
        if tokens is None:  # the handler refused the request: the route says why
            return None
        n_prompt, param = len(tokens), "messages"
    else:
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        if len(prompt.encode("utf-8")) + 1 < n_ctx:  # a token holds at least one byte, plus BOS
            return None
        n_prompt, param = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)), "prompt"
    if n_prompt < n_ctx:
        return None
    laid_out = " (the messages as the model's chat template lays them out)" if param == "messages" else ""
    return (f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt}{laid_out}. "
            f"Please reduce the length of the {param}.", "context_length_exceeded", param)


class _PromptReady(Exception):
    def __init__(self, prompt):
        self.prompt = prompt


class _PromptProbe:
    """Stands in for the served llama_cpp.Llama in a chat handler's call: the handler lays the messages out
    with the model's template and tokenizes them through the real model, then asks this to complete the
    prompt, which stops there with the prompt (nothing is evaluated)."""

    def __init__(self, llama):
        self._llama = llama

    def __getattr__(self, name):
        return getattr(self._llama, name)

    def create_completion(self, prompt, **_):
        raise _PromptReady(prompt)


def chat_prompt_tokens(llama, request) -> list[int] | None:
    """The tokens of the prompt a chat request becomes, through the handler llama_cpp.Llama.create_chat_completion
    picks; None when the handler raises (a template that refuses the messages, an unknown tool...)."""
    from llama_cpp import llama_chat_format

    handler = (llama.chat_handler or llama._chat_handlers.get(llama.chat_format)
               or llama_chat_format.get_chat_completion_handler(llama.chat_format))
    fields = request.model_dump(include={"messages", "functions", "function_call", "tools", "tool_choice"})
    try:
        handler(llama=_PromptProbe(llama), **fields)
    except _PromptReady as ready:
        prompt = ready.prompt
        return llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) if isinstance(prompt, str) \
            else list(prompt)
    except Exception:  # noqa: BLE001 - the route runs the handler again and answers for it
        return None
    return None
