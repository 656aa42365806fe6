"""evaluation/logits.py: logits requested for the scored positions only match llama-cpp-python's
logits_all path on the bundled model, row for row, in several ubatches."""

import numpy as np
import pytest

from iceformer_llama.evaluation.logits import scored_range

N_TOKENS, N_BATCH = 300, 128     # three decode calls: the first scores nothing, the others some rows


def test_scored_range_refuses_nothing_to_score():
    assert scored_range(10, 4) == range(4, 9)
    for n, first in ((1, 0), (10, 9), (10, -1)):
        with pytest.raises(ValueError, match="no position to score"):
            scored_range(n, first)


@pytest.fixture(scope="module")
def models(patched_build, bundled_model):
    import iceformer_llama
    from iceformer_llama.evaluation import corpus

    kw = dict(n_ctx=N_TOKENS + 16, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=1, n_threads_batch=1, flash_attn=True)
    full = iceformer_llama.Llama(bundled_model, logits_all=True, **kw)
    scored = iceformer_llama.Llama(bundled_model, logits_all=False, **kw)
    tokens = corpus.document_tokens(full, N_TOKENS)
    yield full, scored, tokens
    full.close()
    scored.close()


def _all_logits(llm, tokens, attention="dense"):
    llm.set_attention(attention)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


@pytest.mark.parametrize("attention", ["dense", "iceformer"])
@pytest.mark.parametrize("first", [0, 150, N_TOKENS - 2])
def test_scored_rows_match_the_logits_all_path(models, attention, first):
    from iceformer_llama.evaluation.logits import scored_logits

    full, scored, tokens = models
    reference = _all_logits(full, tokens, attention)
    scored.set_attention(attention)
    rows, seconds = scored_logits(scored, tokens, first)
    assert rows.shape == (N_TOKENS - 1 - first, scored.n_vocab()) and seconds > 0
    # the same kernels on the same ubatches: equal to rounding (measured: bit-identical)
    np.testing.assert_allclose(rows, reference[first:N_TOKENS - 1], rtol=0, atol=1e-4)
    assert scored.n_tokens == N_TOKENS   # llama_cpp's bookkeeping follows the prefill


def test_sink_gets_each_decode_calls_rows_in_order(models):
    from iceformer_llama.evaluation.logits import scored_logits

    full, scored, tokens = models
    reference = _all_logits(full, tokens)
    scored.set_attention("dense")
    blocks = []
    rows, _ = scored_logits(scored, tokens, 200, sink=lambda offset, block: blocks.append((offset, block.copy())))
    assert rows is None
    # positions 200..298 lie in the second ubatch (128..255) and the third (256..299)
    assert [(o, len(b)) for o, b in blocks] == [(0, 56), (56, 43)]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), reference[200:N_TOKENS - 1], rtol=0, atol=1e-4)


def test_too_long_for_the_context_is_refused(models):
    from iceformer_llama.evaluation.logits import scored_logits

    _, scored, tokens = models
    with pytest.raises(ValueError, match="do not fit"):
        scored_logits(scored, tokens * 2, 10)
