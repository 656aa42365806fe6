"""The model and runtime flags every command shares, and opening a model from them: one definition."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..errors import UsageError
from .settings import add_arguments, int_at_least

positive = int_at_least(1)
non_negative = int_at_least(0)


def add_model_args(p: argparse.ArgumentParser, *, ctx_default: int) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF path, alias (llama-2-7b, llama-2-7b-chat, llama-2-13b-chat) or REPO_ID:FILENAME; "
                        "default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--backend", choices=("patched", "stock"), default=None,
                   help="llama.cpp build to load (default: $ICEFORMER_LLAMA_BACKEND or patched)")
    p.add_argument("--ctx-size", "-c", type=positive, default=ctx_default, help=f"context tokens (default {ctx_default})")
    p.add_argument("--threads", "-t", type=positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--batch-size", "-b", type=positive, default=512, help="prompt tokens per ubatch (default 512)")
    p.add_argument("--flash-attn", choices=("on", "off", "auto"), default="auto",
                   help="llama.cpp flash attention in dense layers (auto: on, as llama.cpp picks on CPUs)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--temp", type=float, default=None, help="sampling temperature")
    add_arguments(p)


def open_model(args, *, logits_all: bool = False):
    from . import backend
    from .llama import Llama
    from .settings import from_arguments

    settings = from_arguments(args)
    if args.backend:
        backend.use_backend(args.backend)
    if backend.selected() == "stock":  # --backend stock or $ICEFORMER_LLAMA_BACKEND=stock
        if args.attention == "iceformer":
            raise UsageError("--attention iceformer needs the patched backend; stock llama.cpp runs dense attention")
        if settings.overrides():
            flags = ", ".join(f.metadata["flag"] for f in dataclasses.fields(settings)
                              if getattr(settings, f.name) is not None)
            raise UsageError(f"IceFormer knobs ({flags}) need the patched backend; "
                             "stock llama.cpp runs dense attention")
    threads = args.threads or os.cpu_count() or 1
    return Llama(args.model, attention=args.attention, iceformer=settings, n_ctx=args.ctx_size,
                 n_batch=args.batch_size, n_ubatch=args.batch_size, n_threads=threads, n_threads_batch=threads,
                 flash_attn=(args.flash_attn != "off"), logits_all=logits_all,
                 seed=args.seed if args.seed is not None else 0xFFFFFFFF)
