"""Child-process smoke test of freshly built libraries: python -m iceformer_llama.building.smoke LIB_DIR [MODEL].

Prints llama.cpp's system info (the CPU features of the code chosen) as its last line.
"""

import os
import sys


def main() -> int:
    lib_dir = sys.argv[1]
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    import llama_cpp  # noqa: E402  (must follow LLAMA_CPP_LIB_PATH)

    from .ggml_modules import cpu_modules, load_cpu_modules

    if cpu_modules(lib_dir) and load_cpu_modules(lib_dir) == 0:
        print("no CPU backend module of this build runs on this CPU", file=sys.stderr)
        return 1
    llama_cpp.llama_backend_init()
    if len(sys.argv) > 2:
        # A prompt and two generated tokens: where a bad ISA choice (AMX) has crashed before.
        llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=128, n_threads=2, verbose=False)
        out = llm.create_completion("The capital of France is", max_tokens=2, temperature=0.0)
        if not out["choices"]:
            print("no completion", file=sys.stderr)
            return 1
        llm.close()
    print(llama_cpp.llama_print_system_info().decode(errors="replace").strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
