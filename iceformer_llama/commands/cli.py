"""python -m iceformer_llama COMMAND: setup, build, wheelhouse, download, chat, generate, bench, eval, calibrate,
serve."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

from .. import _pins
from ..errors import IceformerError, UsageError
from ..runtime.options import add_model_args, non_negative, open_model, positive


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: python -m iceformer_llama {self.prog.split()[-1]} --help)\n")


def cmd_setup(args) -> int:
    """Installs llama-cpp-python's Python layer, fetches the bundled model, builds the backends."""
    from ..building import build
    from ..runtime import models

    missing = [req for module, req in build.BUILD_TOOLS if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing the build tools {', '.join(missing)}", file=sys.stderr)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing]):
            raise IceformerError("installing the build tools failed; see pip's output above")
    # find_spec, not import: importing llama_cpp loads a libllama, and none is chosen yet
    if importlib.util.find_spec("llama_cpp") is None:
        print(f"installing llama-cpp-python {_pins.LLAMA_CPP_PYTHON_VERSION} (Python layer only)", file=sys.stderr)
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF")
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"llama-cpp-python=={_pins.LLAMA_CPP_PYTHON_VERSION}"], env=env)
        if rc != 0:
            raise IceformerError("installing llama-cpp-python failed; see pip's output above")
    model = models.ensure_bundled_model(progress=sys.stderr.isatty())
    for kind in ("patched", "stock") if args.stock else ("patched",):
        build.build(kind, jobs=args.jobs, smoke_model=model, log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_build(args) -> int:
    from ..building import build
    from ..runtime import models

    if args.info:
        print("\n".join(build.describe()))
        return 0
    model = models.bundled_model_path()
    info = build.build("stock" if args.stock else "patched", jobs=args.jobs, smoke_model=model, force=args.force,
                       portable=args.portable, log=lambda m: print(m, file=sys.stderr))
    print(info.lib_dir)
    return 0


def cmd_wheelhouse(args) -> int:
    from ..building.wheelhouse import make_wheelhouse
    from ..runtime import models

    model = models.ensure_bundled_model(progress=sys.stderr.isatty())
    wheels = make_wheelhouse(args.dir, model=model if args.with_model else None, jobs=args.jobs, smoke_model=model,
                             log=lambda m: print(m, file=sys.stderr))
    for wheel in wheels:
        print(wheel)
    print(f"install elsewhere with: pip install --no-index --find-links {args.dir} iceformer-llama", file=sys.stderr)
    return 0


def cmd_download(args) -> int:
    from ..runtime.models import check_gguf, download_model

    path = download_model(args.model, progress=sys.stderr.isatty())
    check_gguf(path)
    print(path)
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat

    with open_model(args) as llm:
        hint_calibrate(llm)
        return run_chat(llm, max_tokens=args.n_predict, temperature=0.7 if args.temp is None else args.temp,
                        seed=args.seed, system=args.system)


def cmd_generate(args) -> int:
    from ..runtime.generate import generate

    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise UsageError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
    else:
        prompt = args.prompt
    with open_model(args) as llm:
        stream = None if args.json else (lambda piece: (sys.stdout.buffer.write(piece), sys.stdout.flush()))
        result = generate(llm, prompt, n_predict=args.n_predict, temperature=args.temp or 0.0, seed=args.seed,
                          on_text=stream)
        if args.json:
            print(json.dumps({
                "text": result.text, "prompt_tokens": result.prompt_tokens,
                "generated_tokens": result.generated_tokens,
                "prefill_seconds": round(result.prefill_seconds, 6), "decode_seconds": round(result.decode_seconds, 6),
                **result.rates(), "stop_reason": result.stop_reason,
                "backend": llm.backend, "attention": llm.attention, "model": llm.model_path,
                "settings": {"ctx_size": args.ctx_size, "threads": args.threads or os.cpu_count(),
                             "batch_size": args.batch_size, "flash_attn": args.flash_attn, "seed": args.seed,
                             "temp": args.temp or 0.0, "n_predict": args.n_predict,
                             "iceformer": llm.attention_params()},
            }))
        else:
            print()
        hint_calibrate(llm)   # after the output: a bad prompt stays a one-line error
    return 0


def hint_calibrate(llm) -> None:
    """One line on stderr when IceFormer runs a model that has no calibration profile."""
    if llm.backend == "patched" and llm.attention == "iceformer" and llm.profile is None:
        print(f"hint: {os.path.basename(llm.model_path)} is not calibrated; `python -m iceformer_llama calibrate "
              "--model MODEL` finds faster settings for each --speed level on it", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iceformer_llama", description="IceFormer sparse attention in a patched llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("setup", help="install the Python layer, fetch the bundled model, build the patched backend")
    p.add_argument("--stock", action="store_true", help="also build stock llama.cpp (for comparisons and tests)")
    p.add_argument("-j", "--jobs", type=positive, default=None, help="parallel compile jobs")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("build", help="build the patched (or stock) llama.cpp libraries")
    p.add_argument("--stock", action="store_true", help="build stock llama.cpp: same source and flags, no patches")
    p.add_argument("--info", action="store_true", help="print what is built and where")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    p.add_argument("--portable", action="store_true",
                   help="build for any x86-64 CPU with SSE4.2 (or any aarch64): ggml's CPU code for each ISA "
                        "level, the fastest chosen at run time (slower to build; used when no native build exists, "
                        "or with ICEFORMER_LLAMA_BUILD=portable)")
    p.add_argument("-j", "--jobs", type=positive, default=None, help="parallel compile jobs")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("wheelhouse", help="write every wheel needed to install offline, with portable libraries")
    p.add_argument("dir", help="folder for the wheels (created if missing)")
    p.add_argument("--with-model", action="store_true", help="ship the bundled model (SmolLM2-135M, 94 MB) inside the package's wheel")
    p.add_argument("-j", "--jobs", type=positive, default=None, help="parallel compile jobs")
    p.set_defaults(func=cmd_wheelhouse)

    p = sub.add_parser("download", help="download a model from the Hugging Face hub")
    p.add_argument("model", help="alias (llama-2-7b, ...) or REPO_ID:FILENAME")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("chat", help="chat with a model (the bundled one by default)")
    add_model_args(p, ctx_default=4096)
    p.add_argument("-n", "--n-predict", type=non_negative, default=512, help="max tokens per reply (default 512)")
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one completion, optionally as JSON with timings")
    add_model_args(p, ctx_default=4096)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="prompt text")
    src.add_argument("--prompt-file", "-f", help="file holding the prompt")
    p.add_argument("-n", "--n-predict", type=non_negative, default=128, help="tokens to generate (default 128)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and timings")
    p.set_defaults(func=cmd_generate)

    from ..evaluation import bench, calibrate, evaluate
    from . import serve
    bench.register(sub)
    evaluate.register(sub)
    calibrate.register(sub)
    serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IceformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; ICEFORMER_LLAMA_DEBUG=1 shows it
        if os.environ.get("ICEFORMER_LLAMA_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set ICEFORMER_LLAMA_DEBUG=1 for details)", file=sys.stderr)
        return 1
