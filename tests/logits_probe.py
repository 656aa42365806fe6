"""Child process: teacher-forced logits of one backend/attention for a text; saved as .npy.

python tests/logits_probe.py BACKEND ATTENTION OUT.npy N_TOKENS [key=value settings...]
(one backend per process, so comparisons run each side in its own child.)
"""

import codecs
import contextlib
import io
import os
import sys

import numpy as np


def probe_text() -> str:
    with contextlib.redirect_stdout(io.StringIO()):   # `import this` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    return "\n\n".join([zen] * 8)


def main() -> int:
    backend_name, attention, out, n_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    overrides = {}
    for kv in sys.argv[5:]:
        k, v = kv.split("=", 1)
        overrides[k] = v == "true" if v in ("true", "false") else (tuple(int(x) for x in v.split(",") if x) if k in ("dense_layers", "layer_budget") else int(v))

    import iceformer_llama
    from iceformer_llama.runtime.models import bundled_model_path

    iceformer_llama.use_backend(backend_name)
    llm = iceformer_llama.Llama(str(bundled_model_path()), attention=attention,
                                iceformer=iceformer_llama.IceformerSettings(**overrides),
                                n_ctx=max(512, n_tokens + 16), n_batch=512, n_ubatch=512, n_threads=2,
                                n_threads_batch=2, logits_all=True,
                                flash_attn=os.environ.get("PROBE_FLASH_ATTN") == "1")
    tokens = llm.tokenize(probe_text().encode(), add_bos=True)[:n_tokens]
    assert len(tokens) == n_tokens, len(tokens)
    llm.eval(tokens)
    np.save(out, np.array(llm.scores[:n_tokens], dtype=np.float32))
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
