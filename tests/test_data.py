import polars as pl
import pytest

from ncf.data import load_interactions
from ncf.errors import NcfError

ROWS = [(1, 10, 5, 100), (1, 20, 3, 101), (2, 10, 4, 102), (2, 30, 1, 103), (1, 10, 2, 104)]


def _check(inter, user_type=pl.Int64, item_type=pl.Int64):
    assert inter.user_ids.dtype == user_type and inter.item_ids.dtype == item_type
    assert len(inter) == 4  # the duplicate (1, 10) counts once
    assert inter.n_users == 2 and inter.n_items == 3


def test_movielens_u_data(tmp_path):
    p = tmp_path / "u.data"
    p.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    inter = load_interactions(p)
    _check(inter)
    # duplicate pair keeps its latest timestamp
    k = next(j for j in range(len(inter)) if inter.users[j] == 0 and inter.items[j] == 0)
    assert inter.timestamps[k] == 104


def test_movielens_ratings_dat(tmp_path):
    p = tmp_path / "ratings.dat"
    p.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS))
    _check(load_interactions(p))


@pytest.mark.parametrize("header", ["userId,movieId,rating,timestamp", "user,item,score,ts",
                                    "customer_id,product_id,value,time"])
def test_csv_header_spellings(tmp_path, header):
    p = tmp_path / "d.csv"
    p.write_text(header + "\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    _check(load_interactions(p))


def test_string_ids_and_parquet(tmp_path):
    df = pl.DataFrame({"user_id": [f"u{u}" for u, *_ in ROWS], "item_id": [f"x{i}" for _, i, *_ in ROWS]})
    df.write_parquet(tmp_path / "d.parquet")
    _check(load_interactions(tmp_path / "d.parquet"), pl.String, pl.String)
    df.write_csv(tmp_path / "d.tsv", separator="\t")
    _check(load_interactions(tmp_path / "d.tsv"), pl.String, pl.String)


def test_min_rating_and_explicit_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,c\n" + "".join(f"{u},{i},{r}\n" for u, i, r, _ in ROWS))
    inter = load_interactions(p, user_col="a", item_col="b", rating_col="c", min_rating=4)
    assert len(inter) == 2 and inter.timestamps is None


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("user_id,item_id\n", "no rows"),
    ("foo,bar\n1,2\n", "no recognisable user/item columns"),
    ("user_id,item_id\n1,2\n,3\n", "empty user id"),
    ("user_id,item_id\n1.5,2\n2.5,3\n", "fractional"),
])
def test_bad_input_is_a_one_line_error(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(NcfError, match=message) as err:
        load_interactions(p)
    assert "\n" not in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NcfError, match="not found"):
        load_interactions(tmp_path / "nope.csv")
    with pytest.raises(NcfError, match="is a directory"):
        load_interactions(tmp_path)
