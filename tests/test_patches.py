"""The patch series: listed, documented, and applying cleanly to the pinned source."""

import re
import shutil

import pytest

from iceformer_llama import _pins
from iceformer_llama.errors import BuildError
from iceformer_llama.building.source import PATCH_DIR, apply_series, fetch_sdist, patch_paths, prepare_tree


def test_every_patch_is_pinned_and_in_the_readme_table():
    on_disk = sorted(p.name for p in PATCH_DIR.glob("*.patch"))
    assert on_disk == sorted(_pins.PATCHES)
    table = (PATCH_DIR / "README.md").read_text()
    rows = re.findall(r"^\|\s*`?([0-9]{4}-[^|`]+\.patch)`?\s*\|", table, flags=re.M)
    assert sorted(rows) == on_disk


def test_patches_are_git_format_patch_with_a_why():
    for patch in patch_paths():
        text = patch.read_text()
        assert text.startswith("From ") and "\nSubject: [PATCH" in text, patch.name
        body = text.split("\n\n", 1)[1].split("\n---\n", 1)[0]
        assert "Why:" in body, f"{patch.name} does not say why"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return prepare_tree(tmp_path_factory.mktemp("src") / "llama.cpp", patched=False, sdist=fetch_sdist())


def test_series_applies_cleanly_to_the_pinned_source(pristine, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    apply_series(tree, patch_paths())
    assert "llama_set_iceformer_params" in (tree / "include" / "llama.h").read_text()
    assert (tree / "src" / "llama-iceformer.cpp").exists()


def test_a_patch_that_does_not_apply_is_named_with_its_file(pristine, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    graph = tree / "src" / "llama-graph.cpp"
    # Upstream moved on: the context the hook patches is gone.
    text = graph.read_text()
    hooked = "const bool use_flash_attn = cparams.flash_attn && kq_b == nullptr;"
    assert text.count(hooked) == 1
    graph.write_text(text.replace(hooked, "const bool use_flash_attn = wants_flash_attn(cparams, kq_b);"))
    with pytest.raises(BuildError) as err:
        apply_series(tree, patch_paths())
    msg = str(err.value)
    assert _pins.PATCHES[0] in msg and "src/llama-graph.cpp" in msg
    assert "\n" not in msg


def test_ctypes_params_mirror_the_patched_header(pristine, tmp_path):
    """iceformer_llama.runtime.ice_ctypes declares struct llama_iceformer_params by hand: same fields, order and
    C types as the patched llama.h (the whole series applied), or every setting after a mismatch would land
    in the wrong field."""
    import ctypes

    from iceformer_llama.runtime.ice_ctypes import MAX_LAYERS, llama_iceformer_params

    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    apply_series(tree, patch_paths())
    text = (tree / "include" / "llama.h").read_text()
    body = re.search(r"^\s*struct llama_iceformer_params \{\n(.*?)^\s*\};", text, flags=re.M | re.S).group(1)
    header = re.findall(r"^\s*(enum llama_attn_mode|int32_t|uint64_t|uint16_t|float|bool)\s+(\w+)(\[\w+\])?;",
                        body, flags=re.M)
    c_types = {"enum llama_attn_mode": ctypes.c_int, "int32_t": ctypes.c_int32, "uint64_t": ctypes.c_uint64,
               "uint16_t": ctypes.c_uint16, "float": ctypes.c_float, "bool": ctypes.c_bool}
    lengths = {"[4]": 4, "[LLAMA_ICEFORMER_MAX_LAYERS]": MAX_LAYERS}
    expected = [(name, c_types[t] * lengths[n] if n else c_types[t]) for t, name, n in header]
    declared = llama_iceformer_params._fields_
    assert [n for n, _ in declared] == [n for n, _ in expected]
    for (name, got), (_, want) in zip(declared, expected):
        assert ctypes.sizeof(got) == ctypes.sizeof(want) and getattr(got, "_type_", got) == getattr(want, "_type_", want), name
    assert re.search(rf"#define LLAMA_ICEFORMER_MAX_LAYERS {MAX_LAYERS}\b", text)
    from iceformer_llama.runtime import settings
    assert settings.MAX_LAYERS == MAX_LAYERS
    assert re.search(rf"#define LLAMA_ICEFORMER_MAX_LAYER_BUDGET {settings.MAX_LAYER_BUDGET}\b", text)
