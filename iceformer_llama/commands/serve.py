"""python -m iceformer_llama serve: llama-cpp-python's OpenAI-compatible server on our model.

The HTTP side (routes, request types, SSE streaming, the lock that serialises model access, OpenAI-style
error bodies) is llama-cpp-python's `llama_cpp.server.app.create_app`, unchanged. Three things are ours:

- the model: an `iceformer_llama.Llama` opened from the same flags as `chat` and `generate`, so the backend
  and the attention settings apply (see `_create_app` for the hook);
- a 400 with a JSON error, before the route runs, for requests upstream answers with a 500, a crash, an
  error after a stream has started, or takes with out-of-range parameters; and the served model's id (the
  file's name or --alias, never a path) in every request, so in every response (see serve_checks.py);
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
    p.add_argument("--alias", type=_alias, default=None,
                   help="the model's id in /v1/models and in responses (default: the model file's name)")
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


def _alias(text: str) -> str:
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model name, got an empty one")
    return text


def model_id(model_path: str, alias: str | None = None) -> str:
    """The served model's id: the alias, else the model file's name without .gguf."""
    return alias or os.path.splitext(os.path.basename(model_path))[0]


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the server needs its extra packages; run: pip install 'iceformer-llama[server]'") from None
    from ..runtime.options import open_model
    from .cli import hint_calibrate

    sock = _listen(args.host, args.port)
    with sock, open_model(args) as llm:
        hint_calibrate(llm)
        app = _create_app(llm, alias=args.alias, api_key=args.api_key, interrupt_requests=args.interrupt_requests)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        mode = llm.attention_params()["mode"]  # as the library reports it for the context we serve
        print(f"serving {os.path.basename(llm.model_path)} as {model_id(llm.model_path, args.alias)!r} "
              f"({llm.backend} backend, {mode} attention, context {llm.n_ctx()}) on http://{shown}:{port}/v1",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=port, log_level="info", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None


def _create_app(llm, *, alias: str | None = None, api_key: str | None = None, interrupt_requests: bool = False):
    """llama-cpp-python's FastAPI app serving `llm` (an iceformer_llama.Llama, already open) as `alias`
    (default: the model file's name)."""
    from llama_cpp.server import app as server_app
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from .serve_checks import RequestChecks

    served = llm.llama

    # The hook. create_app() builds a LlamaProxy from ModelSettings, and LlamaProxy.__init__ loads its
    # default model through self.load_llama_from_model_settings(), a plain llama_cpp.Llama that would know
    # nothing of our backend choice or attention settings. This subclass answers that call with our
    # already-open llama_cpp.Llama (the one iceformer_llama.Llama wraps and has set attention on), and
    # create_app() is given the subclass for the duration of the call (it looks the name up in its module).
    # With a single model alias the proxy never loads another model; requests naming any model get ours (and
    # RequestChecks names ours in them, so responses do too).
    class _OpenModelProxy(LlamaProxy):
        def load_llama_from_model_settings(self, settings):
            return served

    served_id = model_id(llm.model_path, alias)
    # Explicit values: these are pydantic BaseSettings, which would otherwise take API_KEY, N_CTX... from
    # the environment; and create_app() would let $CONFIG_FILE replace both settings with its own.
    model_settings = ModelSettings(model=llm.model_path, model_alias=served_id, n_ctx=llm.n_ctx(), verbose=False)
    server_settings = ServerSettings(api_key=api_key, interrupt_requests=interrupt_requests)
    saved_config, saved_proxy = os.environ.pop("CONFIG_FILE", None), server_app.LlamaProxy
    server_app.LlamaProxy = _OpenModelProxy
    try:
        app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
    finally:
        server_app.LlamaProxy = saved_proxy
        if saved_config is not None:
            os.environ["CONFIG_FILE"] = saved_config
    app.add_middleware(RequestChecks, llm=llm, api_key=api_key, model_id=served_id)
    return app
