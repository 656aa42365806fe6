#!/usr/bin/env python3
"""Write a tiny random-weight Gemma 3 GGUF whose layers mix sliding-window (SWA) and global attention.

Standalone (needs only numpy and the `gguf` package), e.g. for a test fixture:

    python tests/tiny_gemma3.py OUT.gguf [--layers 4] [--embd 128] [--heads 2] [--heads-kv 1]
                                 [--head-dim 64] [--ff 256] [--swa 512] [--swa-pattern 2] [--vocab-pieces 64] [--vocab N]

llama.cpp loads it as gemma3 with hparams.n_swa = --swa and, with --swa-pattern N, layer il sliding
when il % N < N - 1 (N = 2: layers 0, 2, ... SWA, 1, 3, ... global), so it builds the iSWA KV cache
(a base cache for the global layers, a smaller SWA cache for the others).

Tokenizer: a hand-built SentencePiece ("llama") vocabulary: <pad> <eos> <bos> <unk>, the 256 byte
tokens <0x00>..<0xFF> (byte fallback, so any text tokenizes) and a few word pieces. Weights are
f32 (norms) and f16 (matrices), drawn from a seeded normal distribution: the model is meaningless
but deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gguf

_WORDS = ("hello", "world", "the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with",
          "as", "was", "at", "by", "this", "be", "from", "or", "an", "are", "not", "we", "you", "he",
          "she", "they", "one", "two", "three", "time", "long", "text", "model", "token")


def build_vocab(n_pieces: int, n_vocab: int = 0):
    tokens: list[bytes] = [b"<pad>", b"<eos>", b"<bos>", b"<unk>"]
    types = [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN]
    scores = [0.0, 0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    pieces = ["\u2581" + w for w in _WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    for i, p in enumerate(pieces[:n_pieces]):
        tokens.append(p.encode("utf-8"))
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(i))
    i = 0
    while len(tokens) < n_vocab:  # pad to n_vocab with never-merged pieces (a large output matrix, like Gemma's)
        tokens.append(f"<unused{i}>".encode())
        types.append(gguf.TokenType.USER_DEFINED)
        scores.append(-1e9)
        i += 1
    return tokens, scores, types


def write(path: str | Path, *, layers: int = 4, embd: int = 128, heads: int = 2, heads_kv: int = 1,
          head_dim: int = 64, ff: int = 256, swa: int = 512, swa_pattern: int = 2, ctx: int = 32768,
          vocab_pieces: int = 64, vocab: int = 0, seed: int = 0) -> Path:
    path = Path(path)
    rng = np.random.default_rng(seed)
    arch = "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-gemma3-swa")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    if swa > 0:  # swa = 0: no sliding window, every layer global (llama.cpp then builds a plain KV cache)
        w.add_sliding_window(swa)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)

    tokens, scores, types = build_vocab(vocab_pieces, vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    n_vocab = len(tokens)

    def mat(n_out: int, n_in: int, scale: float = 0.05):
        # numpy shape (rows, cols) = ggml ne (cols, rows): ggml ne {n_in, n_out}
        return (rng.standard_normal((n_out, n_in)) * scale).astype(np.float16)

    def norm(n: int):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, embd, 0.5))
    w.add_tensor("output_norm.weight", norm(embd))
    for il in range(layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm(embd))
        w.add_tensor(p + "attn_q.weight", mat(heads * head_dim, embd))
        w.add_tensor(p + "attn_k.weight", mat(heads_kv * head_dim, embd))
        w.add_tensor(p + "attn_v.weight", mat(heads_kv * head_dim, embd))
        w.add_tensor(p + "attn_output.weight", mat(embd, heads * head_dim))
        w.add_tensor(p + "post_attention_norm.weight", norm(embd))
        w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
        w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(embd))
        w.add_tensor(p + "ffn_gate.weight", mat(ff, embd))
        w.add_tensor(p + "ffn_up.weight", mat(ff, embd))
        w.add_tensor(p + "ffn_down.weight", mat(embd, ff))
        w.add_tensor(p + "post_ffw_norm.weight", norm(embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--heads-kv", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ff", type=int, default=256)
    ap.add_argument("--swa", type=int, default=512, help="sliding window (tokens); 0: none, all layers global")
    ap.add_argument("--swa-pattern", type=int, default=2, help="every Nth layer is global")
    ap.add_argument("--ctx", type=int, default=32768, help="trained context length")
    ap.add_argument("--vocab-pieces", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=0, help="pad the vocabulary to this many tokens (0: no padding)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = write(a.out, layers=a.layers, embd=a.embd, heads=a.heads, heads_kv=a.heads_kv, head_dim=a.head_dim,
                ff=a.ff, swa=a.swa, swa_pattern=a.swa_pattern, ctx=a.ctx, vocab_pieces=a.vocab_pieces, vocab=a.vocab, seed=a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
