"""The explorer's queries (DuckDB over a run's Parquet) against pandas on the same rows: filtered
counts, sorted pages (shallow and deep, every path: rank windows, late materialisation, sorting by
a signal's last checkpoint), the per-class summary, every key's rank and percentile; the
connection reads the run's directory and nothing else, on local disk and on S3 (moto)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import runfactory as rf
from vog_ray.explore.queries import Filters, RunTables
from vog_ray.runs import open_run

N = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run from hand-given columns: two splits, ties in z, signals, flags, a string keep column."""
    rng = np.random.default_rng(3)
    rows = {}
    for split, n in (("train", N), ("test", N // 3)):
        vog = np.round(rng.gamma(2.0, 1.0, n), 1)          # rounded: many ties in z
        label = rng.integers(0, 4, n)
        rows[split] = {"label": label, "pred": np.where(rng.random(n) < 0.7, label, rng.integers(0, 4, n)),
                       "vog_late_logit": vog, "vog_late_softmax": rng.gamma(2.0, 1.0, n),
                       "sig_loss": rng.random((n, 3)), "is_noisy": rng.random(n) < 0.3,
                       "group": np.where(rng.random(n) < 0.5, "a", "b"), "flagged": rng.random(n) < 0.1}
    url = rf.synthetic_run(str(tmp_path_factory.mktemp("q")), rows, targets=("logit", "softmax"))
    r = open_run(url)
    tables = RunTables(r)
    yield tables, r.scores().to_pandas()
    tables.close()


def _expected(df: pd.DataFrame, f: Filters) -> pd.DataFrame:
    m = pd.Series(True, index=df.index)
    if f.split is not None:
        m &= df.split == f.split
    if f.label is not None:
        m &= df.label == f.label
    if f.pred is not None:
        m &= df.pred == f.pred
    if f.mismatch:
        m &= (df.label >= 0) & (df.label != df.pred)
    if f.flagged is not None:
        m &= df.flagged == f.flagged
    for c, v in f.keep.items():
        m &= df[c] == v
    for col, lo, hi in (("percentile", f.pct_min, f.pct_max), ("score", f.z_min, f.z_max)):
        if lo is not None:
            m &= df[col] >= lo
        if hi is not None:
            m &= df[col] <= hi
    return df[m]


FILTERS = [
    Filters(split="train"),
    Filters(),
    Filters(split="train", label=2, mismatch=True),
    Filters(split="test", keep={"is_noisy": True, "group": "b"}, pct_min=20.0, pct_max=90.0),
    Filters(flagged=True),
    Filters(split="train", z_min=-0.5, z_max=1.0, pred=1),
]


@pytest.mark.parametrize("f", FILTERS, ids=range(len(FILTERS)))
@pytest.mark.parametrize("sort, descending", [("score", True), ("score", False), ("vog_late_softmax", True),
                                              ("sig_loss", False), ("rank", True)])
def test_pages_match_pandas(run, f, sort, descending):
    tables, df = run
    exp = _expected(df, f).copy()
    if sort == "sig_loss":
        exp["k"] = [v[-1] for v in exp.sig_loss]
    else:
        exp["k"] = exp[sort]
    # the documented order: the sort column, then split, then rank (within a split: score order)
    exp = exp.sort_values(["k", "split", "rank"], ascending=[not descending, True, True], kind="mergesort")
    if sort in ("score", "rank") and f.split is not None:   # one split: rank order, reversed for ascending
        exp = exp.sort_values("rank", ascending=descending == (sort == "score"), kind="mergesort")
    per_page = 23
    n_pages = max(1, -(-len(exp) // per_page))
    for page in sorted({1, 2, n_pages}):
        got = tables.page(f, sort=sort, descending=descending, page=page, per_page=per_page)
        assert got.total == len(exp)
        want = exp.iloc[(page - 1) * per_page: page * per_page]
        assert [r["id"] for r in got.rows] == want.id.tolist(), (page, sort)
        if got.rows:
            assert got.rows[0]["score"] == pytest.approx(want.score.iloc[0])


def test_score_order_within_a_split_is_rank_order(run):
    """Sorting by score in one split is the score table's rank order: z descending, ties by id."""
    tables, df = run
    got = tables.page(Filters(split="train"), per_page=N).rows
    ref = df[df.split == "train"].sort_values(["score", "id"], ascending=[False, True])
    assert [r["id"] for r in got] == ref.id.tolist()


def test_key_ranks_match_an_independent_ranking(run):
    tables, df = run
    for split in ("train", "test"):
        part = df[df.split == split]
        for _, row in part.sample(8, random_state=1).iterrows():
            got = tables.key_ranks(tables.example(split, row.id))
            for k in ("late_logit", "late_softmax"):
                z = part[f"z_{k}"]
                rank = int(((z > row[f"z_{k}"]) | ((z == row[f"z_{k}"]) & (part.id < row.id))).sum()) + 1
                assert got[k]["rank"] == rank
                assert got[k]["percentile"] == pytest.approx(100.0 * (len(part) - rank + 1) / len(part))
            assert got["late_logit"]["rank"] == row["rank"]            # the ranked key: the table's rank


def test_classes_match_pandas(run):
    tables, df = run
    got = {r["class"]: r for r in tables.classes("train")}
    part = df[df.split == "train"]
    for c, g in part.groupby("target_label"):
        r = got[c]
        assert r["n"] == len(g)
        assert r["error"] == pytest.approx(1 - g.correct.astype(float).mean())
        assert r["mean_z"] == pytest.approx(g.score.mean(), abs=1e-12)
        assert r["mean_vog"] == pytest.approx(g.vog_late_logit.mean())
        assert r["top_decile_share"] == pytest.approx((g.decile == 10).mean())
        assert r["flagged_share"] == pytest.approx(g.flagged.mean())


def test_columns_and_choices(run):
    tables, _ = run
    assert set(tables.keep_choices) == {"is_noisy", "group"} and tables.keep_choices["group"] == ["a", "b"]
    assert tables.has_flagged and tables.splits == ["test", "train"]
    assert "sig_loss" in tables.sort_options() and "z_late_softmax" in tables.sort_options()
    with pytest.raises(ValueError, match="cannot sort"):
        tables.page(Filters(), sort="id; DROP TABLE scores")
    with pytest.raises(ValueError, match="cannot filter"):
        tables.page(Filters(keep={'group" OR 1=1 --': "a"}))


def test_reads_only_the_run(run, tmp_path):
    """The connection is locked to the run's directory: SQL that names another file fails."""
    tables, _ = run
    other = tmp_path / "other.csv"
    other.write_text("id\nx\n")
    for sql in (f"id IN (SELECT * FROM read_csv('{other}'))", "id IN (SELECT * FROM read_csv('/etc/passwd'))"):
        with pytest.raises(Exception, match="disabled by configuration"):
            tables.select(where_sql=sql)
    with pytest.raises(Exception, match="locked"):
        tables.con.execute("SET enable_external_access = true")


@pytest.mark.integration
def test_a_run_on_s3(s3_server):
    """Queries through the run's own S3 filesystem; another prefix of the bucket is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vog_ray.storage import resolve

    rows = {"train": {"label": [0, 1] * 20, "vog_late_logit": np.arange(40.0)}}
    url = rf.synthetic_run(s3_server.url("audits"), rows, storage=s3_server.storage)
    fs, path = resolve(s3_server.url("secret/x.parquet"), s3_server.storage)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({"id": ["r1"]}), f)
    tables = RunTables(open_run(url, s3_server.storage))
    try:
        page = tables.page(Filters(split="train"), per_page=5)
        assert page.total == 40 and [r["rank"] for r in page.rows] == [1, 2, 3, 4, 5]
        with pytest.raises(Exception, match="disabled by configuration"):
            tables.select(where_sql=f"id IN (SELECT id FROM read_parquet('s3://{path}'))")
    finally:
        tables.close()


def test_example_with_and_without_a_rank_hint(run):
    tables, df = run
    row = df[df.split == "train"].iloc[37]
    by_id = tables.example("train", row.id)
    assert by_id["id"] == row.id and by_id["rank"] == row["rank"] and list(by_id["sig_loss"]) == list(row.sig_loss)
    assert tables.example("train", row.id, rank=int(row["rank"])) == by_id
    assert tables.example("train", row.id, rank=int(row["rank"]) + 1) == by_id      # a wrong hint: the scan
    assert tables.example("test", row.id) is None and tables.example("train", "nope", rank=1) is None
