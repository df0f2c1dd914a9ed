"""MetaCLIP balancing (data_tools/curation/metadata.py): matching and the per-entry cap."""

from __future__ import annotations

import pytest
from vlp.data_tools.curation import metadata

from vlp.core.errors import UserError


def test_entries_match_whole_words_in_any_case_and_n_grams():
    match = metadata.Matcher(["cat", "red car", "new york city"])
    assert match("A Cat on a mat") == {"cat"}
    assert match("education catalog") == set()  # a raw substring match would count "cat" in both
    assert match("a red car in New York City, cat-free") == {"red car", "new york city", "cat"}


def test_an_entry_over_the_cap_keeps_about_cap_pairs_and_one_under_keeps_all():
    captions = [f"a photo of a dog {i}" for i in range(5000)] + [f"a cat {i}" for i in range(30)] + ["a fish"]
    keys = [f"{i:06d}" for i in range(len(captions))]
    found, kept, before, after = metadata.balance(captions, keys, ["dog", "cat", "photo"], cap=200, seed=0)
    assert before == {"dog": 5000, "photo": 5000, "cat": 30}
    assert after["cat"] == 30 and found[-1] == set() and not kept[-1]
    # each dog pair is kept if its "dog" or its "photo" draw is under 200/5000: 1 - (1 - 0.04)^2 = 7.84%
    assert 5000 * 0.0784 - 3 * 19 < after["dog"] < 5000 * 0.0784 + 3 * 19
    again = metadata.balance(captions, keys, ["dog", "cat", "photo"], cap=200, seed=0)[1]
    other = metadata.balance(captions, keys, ["dog", "cat", "photo"], cap=200, seed=1)[1]
    assert again == kept and other != kept


def test_an_empty_or_missing_metadata_file_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no entry"):
        metadata.read_entries(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="no such file"):
        metadata.read_entries(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("Cat\ncat\n  New   York \n")
    assert metadata.read_entries(tmp_path / "e.txt") == ["cat", "new york"]


def test_case_sensitive_matching_is_metaclips():
    assert metadata.Matcher(["Apple"], case_sensitive=True)("an apple and Apple Inc") == {"Apple"}
    assert metadata.Matcher(["apple"])("APPLE pie") == {"apple"}
