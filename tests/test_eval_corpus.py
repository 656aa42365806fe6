"""eval's corpus: the catalogue and its split, paragraph deduplication, documents cut to a length, the
user's text files (sources.py, documents.py)."""

import pytest

from iceformer_llama.errors import UsageError
from iceformer_llama.evaluation import documents as D
from iceformer_llama.evaluation import sources as S

LONG = "the quick brown fox jumps over the lazy dog near the river bank today"
OTHER = "a completely different paragraph about tokenizers and the context windows they feed"


class CharTokenizer:
    """One token per byte, BOS = -1: lengths in tokens are lengths in bytes plus one."""

    def tokenize(self, data: bytes, add_bos: bool = True):
        return ([-1] if add_bos else []) + list(data)


# ------------------------------------------------------------------------------------------------
# The catalogue


def test_catalogue_has_a_tune_and_a_report_set_for_every_class():
    ids = [s.id for s in S.CATALOGUE]
    assert len(ids) == len(set(ids))
    for cls in S.CLASSES:
        splits = [s.split for s in S.CATALOGUE if s.klass == cls]
        assert "tune" in splits and "report" in splits and splits.count("report") >= 3, cls
    assert all(s.licence and s.what for s in S.CATALOGUE)
    # the copy-heavy groups cover the docstring text eval used before, each module once
    groups = [s.name.split(",") for s in S.CATALOGUE if s.klass == "copy-heavy"]
    assert sum(groups, []) == list(S.corpus._MODULES)


def test_paragraphs_split_on_blank_lines_and_keep_indentation():
    assert S.paragraphs("a\n  b  \n\n   \n\n    c\nd\n") == ["a\n  b", "    c\nd"]


def test_python_sources_read_on_any_machine():
    assert "assignment_stmt" in S.python_topics()
    assert S.python_source("optparse").startswith('"""A powerful, extensible')
    with pytest.raises(S.SourceMissing):
        S.python_source("sys")            # built in: no .py file


def test_man_page_renders_as_plain_prose():
    try:
        text = S.render_man("bash")
    except S.SourceMissing as e:
        pytest.skip(f"no man page here: {e}")
    assert text.startswith("NAME\n") and "Bourne-Again SHell" in text
    assert "\x1b" not in text and "\x08" not in text and ".SH" not in text   # no styling, no roff left
    with pytest.raises(S.SourceMissing):
        S.render_man("no-such-page-here")


def test_info_manual_drops_node_headers_and_menus():
    try:
        text = S.render_info("grep")
    except S.SourceMissing as e:
        pytest.skip(f"no info manual here: {e}")
    assert "Given one or more patterns" in text
    assert "Node:" not in text and "* Menu:" not in text and "\x1f" not in text


# ------------------------------------------------------------------------------------------------
# Deduplication


def test_dedup_drops_exact_and_near_duplicates_across_documents():
    d = D.Deduplicator()
    kept, exact, near = d.filter([LONG, "Options", OTHER])
    assert kept == [LONG, "Options", OTHER] and (exact, near) == (0, 0)
    reworded = LONG.replace("today", "yesterday")                 # one word of 15 changed
    case = LONG.upper().replace(" ", "  ") + "."                  # same words: an exact repeat
    kept, exact, near = d.filter([case, reworded, "Options", "Options", "new text about something else entirely here ok"])
    # a short paragraph (a heading) may recur in another document, but not twice in one
    assert kept == ["Options", "new text about something else entirely here ok"] and (exact, near) == (2, 1)


def test_prepare_dedups_in_catalogue_order_except_copy_heavy():
    cat = (S.Source("a", "prose", "report", "t", "", "x", ""), S.Source("b", "prose", "tune", "t", "", "x", ""),
           S.Source("c", "copy-heavy", "report", "t", "", "x", ""), S.Source("gone", "code", "report", "t", "", "x", ""))
    texts = {"a": f"{LONG}\n\n{OTHER}", "b": f"{OTHER}\n\nb's own words make up this quite long new paragraph",
             "c": f"{LONG}\n\n{LONG}"}

    def read(src):
        if src.id not in texts:
            raise S.SourceMissing("not installed")
        return texts[src.id]

    a, b, c, gone = D.prepare(cat, read)
    assert a.text == f"{LONG}\n\n{OTHER}" and a.paragraphs == 2
    assert b.text == "b's own words make up this quite long new paragraph" and b.dropped_exact == 1
    assert c.text == f"{LONG}\n\n{LONG}"                      # copy-heavy keeps its repetition
    assert gone.text is None and gone.as_dict()["missing"] == "not installed"
    assert D.select([a, b, c, gone], ["prose", "code"], "report") == [a]
    assert D.select([a, b, c, gone], ["prose", "copy-heavy"], "all", per_class=1) == [a, c]


def test_tune_and_report_share_no_long_paragraph_on_this_machine():
    prepared = [p for p in D.catalogue() if p.text is not None]
    assert {p.source.klass for p in prepared} == set(S.CLASSES)

    def long_paras(split):
        return {" ".join(D._words(x)) for p in prepared if p.source.split == split and p.source.klass != "copy-heavy"
                for x in S.paragraphs(p.text) if len(D._words(x)) >= D.MIN_WORDS}

    assert long_paras("tune") and long_paras("report") and not long_paras("tune") & long_paras("report")


# ------------------------------------------------------------------------------------------------
# Documents of a length, text files


def test_documents_are_cut_to_the_length_or_skipped():
    p = D.Prepared(S.Source("s", "prose", "report", "t", "", "MIT", ""), "x" * 100, 1)
    docs, skipped = D.documents_at(CharTokenizer(), 50, [p])
    assert [len(d.tokens) for d in docs] == [50] and docs[0].tokens[0] == -1
    assert docs[0].describe() == {"document": "s", "class": "prose", "split": "report", "n_tokens": 50}
    docs, skipped = D.documents_at(CharTokenizer(), 102, [p])
    assert docs == [] and skipped == [{"document": "s", "n_tokens": 102, "reason": "shorter than the length"}]


def test_text_file_is_scored_as_written_or_refused_when_short(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text(f"{LONG}\n\n{LONG}\n")
    (doc,) = D.text_file_documents(CharTokenizer(), [str(f)], 60)
    assert doc.id == "file:notes.txt" and doc.klass == "user" and bytes(doc.tokens[1:]) == f.read_bytes()[:59]
    have = len(f.read_bytes()) + 1                                  # and BOS
    with pytest.raises(UsageError, match=rf"has {have} tokens, fewer than the 500 asked for"):
        D.text_file_documents(CharTokenizer(), [str(f)], 500)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="not UTF-8"):
        D.read_text_file(str(tmp_path / "bin"))
    with pytest.raises(UsageError, match="No such file"):
        D.read_text_file(str(tmp_path / "absent.txt"))


def test_classes_argument():
    assert D.check_classes("all") == list(S.CLASSES)
    assert D.check_classes("code, prose") == ["code", "prose"]
    assert D.check_classes("none") == []
    with pytest.raises(ValueError, match="unknown class poetry"):
        D.check_classes("prose,poetry")
