"""python -m iceformer_llama serve: llama-cpp-python's OpenAI-compatible server on our model.

The HTTP side (routes, request types, SSE streaming, the lock that serialises model access, OpenAI-style
error bodies) is llama-cpp-python's `llama_cpp.server.app.create_app`, unchanged. Three things are ours:

- the model: an `iceformer_llama.Llama` opened from the same flags as `chat` and `generate`, so the backend
  and the attention settings apply (see `_create_app` for the hook);
- a 400 with a JSON error, before the route runs, for requests upstream answers with a 500, a crash, or
  an error after a stream has started (see `_add_request_checks`);
- the listening socket is bound before the model loads, so a busy port fails at once, in one line.
"""

from __future__ import annotations

import os
import socket
import sys

from ..errors import UsageError


def register(subparsers) -> None:
    from ..runtime.options import add_model_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions and chat)")
    add_model_args(p, ctx_default=4096)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--interrupt-requests", action="store_true",
                   help="a new request cuts short a stream in progress (default: it waits its turn)")
    p.set_defaults(func=cmd_serve)


def _port(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {value}")
    return value


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the server needs its extra packages; run: pip install 'iceformer-llama[server]'") from None
    from ..runtime.options import open_model

    sock = _listen(args.host, args.port)
    with sock, open_model(args) as llm:
        app = _create_app(llm, api_key=args.api_key, interrupt_requests=args.interrupt_requests)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        mode = llm.attention_params()["mode"]  # as the library reports it for the context we serve
        print(f"serving {os.path.basename(llm.model_path)} ({llm.backend} backend, {mode} attention, "
              f"context {llm.n_ctx()}) on http://{shown}:{port}/v1", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=port, log_level="info", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None


def _create_app(llm, *, api_key: str | None = None, interrupt_requests: bool = False):
    """llama-cpp-python's FastAPI app serving `llm` (an iceformer_llama.Llama, already open)."""
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    served = llm.llama

    # The hook. create_app() builds a LlamaProxy from ModelSettings, and LlamaProxy.__init__ loads its
    # default model through self.load_llama_from_model_settings(), a plain llama_cpp.Llama that would know
    # nothing of our backend choice or attention settings. This subclass answers that call with our
    # already-open llama_cpp.Llama (the one iceformer_llama.Llama wraps and has set attention on), and
    # create_app() is given the subclass for the duration of the call (it looks the name up in its module).
    # With a single model alias the proxy never loads another model; requests naming any model get ours.
    class _OpenModelProxy(LlamaProxy):
        def load_llama_from_model_settings(self, settings):
            return served

    alias = os.path.splitext(os.path.basename(llm.model_path))[0]
    # Explicit values: these are pydantic BaseSettings, which would otherwise take API_KEY, N_CTX... from
    # the environment; and create_app() would let $CONFIG_FILE replace both settings with its own.
    model_settings = ModelSettings(model=llm.model_path, model_alias=alias, n_ctx=llm.n_ctx(), verbose=False)
    server_settings = ServerSettings(api_key=api_key, interrupt_requests=interrupt_requests)
    saved_config, saved_proxy = os.environ.pop("CONFIG_FILE", None), server_app.LlamaProxy
    server_app.LlamaProxy = _OpenModelProxy
    try:
        app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
    finally:
        server_app.LlamaProxy = saved_proxy
        if saved_config is not None:
            os.environ["CONFIG_FILE"] = saved_config
    _add_request_checks(app, llm, api_key)
    return app


def _add_request_checks(app, llm, api_key: str | None) -> None:
    """Bad requests get a 400 with an OpenAI-style JSON error, before llama-cpp-python's route runs.

    Its route wrapper answers a body that is not JSON, or does not match the request type, with a 500
    (its error path parses the body again); an empty prompt reaches an assert (500); a grammar llama.cpp
    cannot parse kills the process (a NULL sampler is added to the chain); and a streamed request that
    fails the context check fails after its 200 is out. So those are checked here, with the same types.
    """
    import json

    from fastapi.responses import JSONResponse
    from llama_cpp.server import types
    from pydantic import ValidationError

    request_types = {
        "/v1/completions": types.CreateCompletionRequest,
        "/v1/engines/copilot-codex/completions": types.CreateCompletionRequest,
        "/v1/chat/completions": types.CreateChatCompletionRequest,
        "/v1/embeddings": types.CreateEmbeddingRequest,
        "/extras/tokenize": types.TokenizeInputRequest,
        "/extras/tokenize/count": types.TokenizeInputRequest,
        "/extras/detokenize": types.DetokenizeInputRequest,
    }

    @app.middleware("http")
    async def check_request(request, call_next):
        request_type = request_types.get(request.url.path.rstrip("/"))
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        unauthorized = api_key is not None and (scheme.lower(), key) != ("bearer", api_key)
        if request.method != "POST" or request_type is None or unauthorized:
            return await call_next(request)  # not ours to check, or the route answers 401
        try:
            body = json.loads(await request.body())
            request_type.model_validate(body)
            problem = _check_body(llm, request_type, body)
        except ValidationError as e:  # a ValueError too: first
            problem = ("; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()),
                       None, str(e.errors()[0]["loc"][0]) if e.errors()[0]["loc"] else None)
        except ValueError as e:  # UnicodeDecodeError included
            problem = (f"the request body is not valid JSON: {e}", None, None)
        if problem is None:
            return await call_next(request)
        message, code, param = problem
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": code}}, status_code=400)


def _check_body(llm, request_type, body: dict) -> tuple[str, str | None, str | None] | None:
    """(message, code, param) for a well-typed body that cannot be served, else None."""
    from llama_cpp.server import types

    if request_type is types.CreateChatCompletionRequest:
        prompt, messages = None, body.get("messages")
        if not messages:  # upstream's default is [], which would chat about nothing
            return "messages must hold at least one message", None, "messages"
    elif request_type is types.CreateCompletionRequest:
        prompt, messages = body.get("prompt"), None
        if isinstance(prompt, list):
            if len(prompt) > 1:
                return "one prompt per request", None, "prompt"
            prompt = prompt[0] if prompt else None
        if not prompt or not llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True):
            return "prompt is required and must not be empty", None, "prompt"
    else:
        return None
    if body.get("grammar") is not None and not _grammar_parses(llm, body["grammar"]):
        return "llama.cpp cannot parse the grammar (it needs a 'root' rule)", None, "grammar"
    if body.get("stream") is True:
        return _stream_over_context(llm, prompt, messages)
    return None


def _grammar_parses(llm, grammar: str) -> bool:
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm.llama._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _stream_over_context(llm, prompt: str | None, messages: list | None):
    """The error for a streamed request whose prompt does not fit the context, else None.

    Counts tokens as llama_cpp.Llama does for a plain prompt; a chat is counted as its messages' text, a
    lower bound (the template adds tokens), so a chat that slips past this still fails, but mid-stream.
    """
    if prompt is None:
        prompt = "".join(m["content"] for m in messages or () if isinstance(m.get("content"), str))
    n_ctx = llm.n_ctx()
    if len(prompt.encode("utf-8")) + 1 < n_ctx:  # a token holds at least one byte, plus BOS
        return None
    n_prompt = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    if n_prompt < n_ctx:
        return None
    return (f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt}. "
            f"Please reduce the length of the prompt.", "context_length_exceeded",
            "messages" if messages is not None else "prompt")
