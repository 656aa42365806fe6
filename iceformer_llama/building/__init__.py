"""Building llama.cpp: the pinned source, the patch series, compiled and smoke-tested libraries."""
