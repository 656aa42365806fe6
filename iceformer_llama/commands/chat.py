"""The interactive chat loop: the model's own chat template, streaming, /reset, /exit, Ctrl-C."""

from __future__ import annotations

import dataclasses
import secrets
import sys

from ..runtime.settings import DEFAULT_SPEED, SPEED_LEVELS

HELP = "/reset starts over, /speed N sets the latency knob, /exit quits, Ctrl-C stops a reply"


def _read_line(stream, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = stream.readline()
    return None if line == "" else line


def _context_full(llm, n_ctx: int) -> bool:
    return llm.n_tokens >= n_ctx - 1


def fresh_seed() -> int:
    """A sampling seed drawn from the OS, below LLAMA_DEFAULT_SEED (0xFFFFFFFF, which llama.cpp reads as
    "pick one yourself", so it could not be reported or reproduced)."""
    return secrets.randbelow(0xFFFFFFFF)


def run_chat(llm, *, max_tokens: int, temperature: float, seed: int | None, system: str | None = None,
             stdin=None, stdout=None, stderr=None) -> int:
    """Chats until /exit or end of input. One user turn per line when stdin is not a TTY.

    seed None draws a fresh one (said on stderr when sampling): llama-cpp-python, given no seed, derives
    each reply's from the Llama's own fixed seed through random.Random, so every run gave the same replies."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if seed is None:
        seed = fresh_seed()
        if temperature > 0:
            print(f"sampling seed {seed} (use --seed {seed} to reproduce this chat)", file=stderr or sys.stderr,
                  flush=True)
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    n_ctx = llm.n_ctx()
    if interactive:
        print(f"Chatting with {llm.model_info.name or llm.model_path} ({llm.backend} backend, "
              f"{llm.attention} attention, context {n_ctx} tokens). {HELP}.", file=out)
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            print(file=out)
            return 0
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            llm.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if text == "/speed" or text.startswith("/speed "):
            print(_speed_command(llm, text[len("/speed"):].strip()), file=out, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"(unknown command {text}; {HELP})", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        reply = _reply(llm, history, max_tokens=max_tokens, temperature=temperature, seed=seed, out=out)
        if reply is None:
            history.pop()
            print(f"(the context is full: {n_ctx} tokens; /reset to start a new conversation, "
                  "or restart with a larger --ctx-size)", file=out, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        if _context_full(llm, n_ctx):
            print(f"(the context is full: {n_ctx} tokens; /reset to start a new conversation)", file=out, flush=True)


def _speed_command(llm, arg: str) -> str:
    """/speed shows the latency knob, /speed N sets it for the next replies (the cache is kept)."""
    lo, hi = min(SPEED_LEVELS), max(SPEED_LEVELS)
    if llm.attention != "iceformer":
        return f"(/speed needs iceformer attention; this chat runs {llm.attention} attention)"
    if not arg:
        level = llm.iceformer_settings.speed
        shown = level if level is not None else f"{DEFAULT_SPEED} (default)"
        return f"(speed {shown}; /speed {lo}..{hi}, {lo} = most exact)"
    try:
        level = int(arg)
    except ValueError:
        level = None
    if level not in SPEED_LEVELS:
        return f"(speed must be a number from {lo} to {hi}, got {arg!r})"
    llm.set_attention("iceformer", dataclasses.replace(llm.iceformer_settings, speed=level))
    knobs = ", ".join(f"{k}={v}" for k, v in llm.iceformer_settings.kernel_overrides().items())
    return f"(speed {level}: {knobs})"


def _reply(llm, history, *, max_tokens, temperature, seed, out) -> str | None:
    """Streams one reply; None when the conversation no longer fits the context."""
    try:
        stream = llm.create_chat_completion(messages=history, stream=True, max_tokens=max_tokens,
                                            temperature=temperature, seed=seed)
        parts: list[str] = []
        try:
            for chunk in stream:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    parts.append(delta)
                    out.write(delta)
                    out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write(" [stopped]")
    except ValueError as e:
        if "exceed context window" in str(e):
            return None
        raise
    out.write("\n")
    out.flush()
    return "".join(parts)
