"""Child process: the bundled model's cached keys after a corpus document, saved as .npy.

python tests/real_keys.py OUT.npy N_TOKENS LAYER[,LAYER...]  ->  float32 [n_layers, n_head_kv, n_tokens, head_dim]

Keys are read from llama.cpp's own sequence state (llama_state_seq_get_data), after the layer header
that state_write_data writes: u32 v_trans, u32 n_layer, then per layer i32 type, u64 row size, rows.
"""

import ctypes
import struct
import sys

import numpy as np


def main() -> int:
    out, n, layers = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    import iceformer_llama as il
    from iceformer_llama.evaluation import corpus

    llm = il.Llama(None, n_ctx=n + 64, n_batch=512, n_ubatch=512, n_threads=2, attention="dense")
    info = llm.model_info
    tokens = corpus.document_tokens(llm, n)
    llm.eval(tokens)
    import llama_cpp  # loaded by iceformer_llama with the chosen backend

    ctx = llm.llama.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    data = bytes(buf[: llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)])
    n_layer, n_head_kv = info.n_layers, info.n_head_kv
    head_dim = info.head_dim
    row = 2 * n_head_kv * head_dim  # f16 rows
    starts = [data.find(struct.pack("<IIiQ", vt, n_layer, 1, row)) for vt in (0, 1)]
    start = max(starts)
    assert start >= 0 and min(starts) == -1, "K section not found (f16 cache expected)"
    pos = start + 8
    keys = []
    for il_ in range(n_layer):
        k_type, k_row = struct.unpack_from("<iQ", data, pos)
        assert (k_type, k_row) == (1, row), (il_, k_type, k_row)
        pos += 12
        k = np.frombuffer(data, dtype=np.float16, count=len(tokens) * n_head_kv * head_dim, offset=pos)
        pos += len(tokens) * row
        if il_ in layers:
            keys.append(k.reshape(len(tokens), n_head_kv, head_dim).transpose(1, 0, 2).astype(np.float32))
    np.save(out, np.stack(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
