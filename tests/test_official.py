"""The NCF authors' test-file format, on hand-made files (the real ones are licensed data)."""

import numpy as np
import polars as pl
import pytest

from ncf.errors import NcfError
from ncf.official import load_official_test, official_metrics, official_test_pairs


@pytest.fixture
def files(tmp_path):
    # original ratings file: users 7, 9; items in first-appearance order 50, 40, 60, 70
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("7::50::5::1\n7::40::4::2\n9::60::3::3\n9::50::2::4\n9::70::1::5\n")
    # authors' ids: user 0 = 7, user 1 = 9; item 0 = 50, 1 = 40, 2 = 60, 3 = 70, 4 = unknown
    (tmp_path / "t.test.rating").write_text("0\t1\t4\t2\n1\t3\t1\t5\n")
    # user 0's negatives list its own test item (1) once, and an item no file knows (4)
    (tmp_path / "t.test.negative").write_text("(0,1)\t2\t1\t4\n(1,3)\t1\t2\t4\n")
    return ratings, tmp_path / "t.test.rating", tmp_path / "t.test.negative"


def test_remap_duplicates_and_unknown_items(files):
    ratings, rating, negative = files
    users, items = pl.Series([7, 9]), pl.Series([40, 50, 60, 70])  # sorted vocabularies
    t = load_official_test(rating, negative, users, items, remap_from=ratings)
    assert t.users.tolist() == [0, 1]
    assert t.items.tolist() == [0, 3]  # raw 40 and 70
    assert t.negatives.tolist() == [[2, -1, -1], [0, 2, -1]]  # dup and unknown dropped
    assert t.unknown_negatives.tolist() == [1, 1]
    assert t.n_positive_in_negatives == 1
    assert [x.tolist() for x in official_test_pairs(rating, users, items, ratings)] == [[0, 1], [0, 3]]


def test_official_metrics_hand_computed(files):
    ratings, rating, negative = files
    users, items = pl.Series([7, 9]), pl.Series([40, 50, 60, 70])
    t = load_official_test(rating, negative, users, items, remap_from=ratings)
    item_score = np.array([0.5, 0.9, 0.1, 0.05])  # 40, 50, 60, 70
    seen_u, seen_i = np.array([0, 0, 1, 1, 1]), np.array([1, 0, 2, 1, 3])
    m = official_metrics(lambda u, i: item_score[i], t, seen_u, seen_i, 4, k=1)
    # user 0: test 40 (0.5) vs negative 60 (0.1) -> rank 0; user 1: test 70 (0.05) vs 40, 60 -> rank 2
    assert m["hr@1"] == 0.5 and m["ndcg@1"] == 0.5
    # pessimistic: each unknown negative counted above the test item -> ranks 1 and 3
    assert m["pessimistic_hr@1"] == 0.0
    # full ranking: user 0 ranks 40 against 60, 70 (50 is seen) -> 0; user 1: 70 vs 40 -> 1
    assert m["full_hr@1"] == 0.5


def test_mismatched_files_are_an_error(files, tmp_path):
    ratings, rating, negative = files
    negative.write_text("(0,2)\t1\n(1,3)\t1\n")
    with pytest.raises(NcfError, match="same"):
        load_official_test(rating, negative, pl.Series([7, 9]), pl.Series([40, 50]), ratings)
