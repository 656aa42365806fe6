"""Child process: runs KV-cache scenarios on the patched backend and saves the logits they record.

python tests/kv_scenarios.py SPEC.json OUT.npz

SPEC is {"runs": {NAME: RUN, ...}}; each RUN builds one llama_context on the bundled model and applies
its steps in order. OUT.npz holds, per run, NAME: the recorded logits stacked [n_recorded, n_vocab]
(f32), and NAME.rss, NAME.ice_memory: int64 samples from "sample" steps, when there are any.

RUN: {"ctx": {n_ctx, n_batch, n_ubatch, n_seq_max, kv_unified, flash_attn},   (all optional)
      "attention": "dense" | "iceformer", "settings": {IceformerSettings fields},
      "steps": [STEP, ...]}

Tokens are named, not listed: ["A", i, j] is A[i:j] and ["B", i, j] is B[i:j], where A is the Zen of
Python repeated (tests/logits_probe.py) and B another text (the Zen's rot13 source and its reversal),
both tokenised with BOS; a plain list of ints is taken as is. STEPs (seq, p0, p1 as in llama_memory_*; -1 = open end):
  ["decode", SEQS, TOKENS, POS0, LOGITS]  one llama_decode of TOKENS at positions POS0.. in the sequences
                                          SEQS (an int or a list: a token shared by several); LOGITS is
                                          "last" (record the last row), "all" (every row), "none", or
                                          an int k (every k-th row and the last)
  ["mixed", [[SEQ, TOKENS, POS0], ...], LOGITS]  one llama_decode interleaving several sequences
                                          token by token (records rows in batch order)
  ["step", SEQ, TOKENS, POS0, RECORD]     one llama_decode per token, recording each token's logits
                                          unless RECORD is false
  ["rm", SEQ, P0, P1]  ["cp", SRC, DST, P0, P1]  ["keep", SEQ]  ["add", SEQ, P0, P1, DELTA]
  ["div", SEQ, P0, P1, D]  ["clear", DATA]                       (llama_memory_*)
  ["save", SLOT]  ["load", SLOT]                                  (llama_state_get_data / set_data)
  ["seq_save", SEQ, SLOT]  ["seq_load", SLOT, DEST_SEQ]           (llama_state_seq_get_data / set_data)
  ["attention", MODE, SETTINGS]          switch attention between decodes (settings: null = the run's)
  ["shift_run", SEQ, N, POS0, N_KEEP]     N greedy one-token decodes with llama.cpp's context shift
                                          (when the cache is full: drop half of the cells after the first
                                          N_KEEP positions, shift the rest back); every 100 tokens records
                                          the logits and an RSS/kernel-memory sample
  ["sample"]                              one RSS / kernel-memory sample
  ["leak", NBYTES]                        keeps NBYTES of touched memory (a control for the RSS bound)
"""

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logits_probe import probe_text  # noqa: E402  (the same text as the dense-identity test)

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def other_text() -> str:
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "\n\n".join([this.s, codecs.decode(this.s, "rot13")[::-1]] * 3)


class Runner:
    def __init__(self, llama_cpp, api, settings_cls, model, vocab):
        self.lc, self.api, self.settings_cls, self.model, self.vocab = llama_cpp, api, settings_cls, model, vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.texts = {"A": self.tokenize(probe_text()), "B": self.tokenize(other_text())}

    def tokenize(self, text: str) -> list:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 16))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        assert n > 0, n
        return list(buf[:n])

    def tokens(self, spec) -> list:
        if spec and isinstance(spec[0], str):
            name, i, j = spec
            out = self.texts[name][i:j]
            assert len(out) == j - i, (spec, len(self.texts[name]))
            return out
        return list(spec)

    def settings(self, d):
        d = dict(d or {})
        if "dense_layers" in d:
            d["dense_layers"] = tuple(d["dense_layers"])
        return self.settings_cls(**d)

    def run(self, spec: dict):
        lc = self.lc
        c = spec.get("ctx", {})
        cp = lc.llama_context_default_params()
        cp.n_ctx = c.get("n_ctx", 512)
        cp.n_batch = c.get("n_batch", 512)
        cp.n_ubatch = c.get("n_ubatch", 512)
        cp.n_seq_max = c.get("n_seq_max", 1)
        cp.kv_unified = c.get("kv_unified", True)
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if c.get("flash_attn")
                              else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = lc.llama_init_from_model(self.model, cp)
        assert ctx, "llama_init_from_model failed"
        self.ctx, self.n_ctx, self.n_batch = ctx, lc.llama_n_ctx(ctx), cp.n_batch
        self.base_settings = self.settings(spec.get("settings"))
        self.api.set(ctx, spec.get("attention", "dense"), self.base_settings)
        self.mem = lc.llama_get_memory(ctx)
        self.batch = lc.llama_batch_init(cp.n_batch, 0, max(2, cp.n_seq_max))
        self.saved, self.rows, self.rss, self.ice_mem, self.leaked = {}, [], [], [], []
        try:
            for step in spec["steps"]:
                getattr(self, "op_" + step[0])(*step[1:])
        finally:
            lc.llama_batch_free(self.batch)
            lc.llama_free(ctx)
        out = {}
        if self.rows:
            out[""] = np.stack(self.rows).astype(np.float32)
        if self.rss:
            out[".rss"] = np.array(self.rss, dtype=np.int64)
            out[".ice_memory"] = np.array(self.ice_mem, dtype=np.int64)
        return out

    # -- decoding ---------------------------------------------------------------------------------
    def _decode(self, items, logits: str):
        """items: (token, pos, seqs) in batch order."""
        assert 0 < len(items) <= self.n_batch, len(items)
        b = self.batch
        for i, (tok, pos, seqs) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = self._wanted(logits, i, len(items))
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode returned {rc}"
        for i in [i for i in range(len(items)) if self._wanted(logits, i, len(items))]:
            ptr = self.lc.llama_get_logits_ith(self.ctx, i)
            self.rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    @staticmethod
    def _wanted(logits, i: int, n: int) -> bool:
        if isinstance(logits, int):
            return i % logits == 0 or i == n - 1
        return logits == "all" or (logits == "last" and i == n - 1)

    def op_decode(self, seqs, tokens, pos0, logits="last"):
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        self._decode([(t, pos0 + i, seqs) for i, t in enumerate(self.tokens(tokens))], logits)

    def op_mixed(self, parts, logits="last"):
        streams = [[(t, pos0 + i, [seq]) for i, t in enumerate(self.tokens(toks))] for seq, toks, pos0 in parts]
        items = []
        for k in range(max(len(s) for s in streams)):
            items += [s[k] for s in streams if k < len(s)]
        self._decode(items, logits)

    def op_step(self, seq, tokens, pos0, record=True):
        for i, t in enumerate(self.tokens(tokens)):
            self._decode([(t, pos0 + i, [seq])], "last" if record else "none")

    def op_shift_run(self, seq, n, pos0, n_keep):
        lc, pos, last = self.lc, pos0, self.rows[-1]
        for i in range(n):
            if pos >= self.n_ctx:   # llama.cpp's context shift (tools/main): drop half after n_keep, shift back
                n_discard = (pos - n_keep) // 2
                assert lc.llama_memory_seq_rm(self.mem, seq, n_keep, n_keep + n_discard)
                lc.llama_memory_seq_add(self.mem, seq, n_keep + n_discard, pos, -n_discard)
                pos -= n_discard
            self._decode([(int(np.argmax(last)), pos, [seq])], "last")
            last = self.rows.pop()
            assert np.isfinite(last).all(), f"non-finite logits at token {i}"
            pos += 1
            if (i + 1) % 100 == 0:
                self.rows.append(last)
                self.op_sample()

    def op_leak(self, nbytes):
        """The negative control of the RSS bound: holds nbytes of touched memory until the run ends."""
        self.leaked.append(bytearray(b"x" * nbytes))

    def op_sample(self):
        self.rss.append(rss_bytes())
        self.ice_mem.append(self.api.memory(self.ctx))

    # -- cache edits ------------------------------------------------------------------------------
    def op_rm(self, seq, p0, p1):
        assert self.lc.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def op_cp(self, src, dst, p0, p1):
        self.lc.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def op_keep(self, seq):
        self.lc.llama_memory_seq_keep(self.mem, seq)

    def op_add(self, seq, p0, p1, delta):
        assert self.lc.llama_memory_can_shift(self.mem)
        self.lc.llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def op_div(self, seq, p0, p1, d):
        self.lc.llama_memory_seq_div(self.mem, seq, p0, p1, d)

    def op_clear(self, data):
        self.lc.llama_memory_clear(self.mem, bool(data))

    def op_save(self, slot):
        n = self.lc.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * n)()
        assert self.lc.llama_state_get_data(self.ctx, buf, n) == n
        self.saved[slot] = buf

    def op_load(self, slot):
        buf = self.saved[slot]
        assert self.lc.llama_state_set_data(self.ctx, buf, len(buf)) == len(buf)

    def op_seq_save(self, seq, slot):
        n = self.lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        assert self.lc.llama_state_seq_get_data(self.ctx, buf, n, seq) == n
        self.saved[slot] = buf

    def op_seq_load(self, slot, seq):
        buf = self.saved[slot]
        assert self.lc.llama_state_seq_set_data(self.ctx, buf, len(buf), seq) == len(buf)

    def op_attention(self, mode, settings=None):
        self.api.set(self.ctx, mode, self.base_settings if settings is None else self.settings(settings))


def main() -> int:
    spec_path, out = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())

    import iceformer_llama
    from iceformer_llama.runtime import backend
    from iceformer_llama.runtime.models import bundled_model_path

    iceformer_llama.use_backend("patched")
    lc = backend.load()
    from llama_cpp._logger import set_verbose
    set_verbose(False)
    mp = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(bundled_model_path()).encode(), mp)
    assert model, "model load failed"
    runner = Runner(lc, backend.iceformer_api(), iceformer_llama.IceformerSettings, model,
                    lc.llama_model_get_vocab(model))
    arrays = {}
    for name, run in spec["runs"].items():
        for suffix, arr in runner.run(run).items():
            arrays[name + suffix] = arr
    np.savez(out, **arrays)
    lc.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
