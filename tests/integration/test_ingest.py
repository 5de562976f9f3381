"""The ingestion stage on a real local Ray: outputs, determinism, formats, failures, streaming."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fabric.config import PipelineConfig, load_config
from fabric.data import load_meta, load_preprocessor, read_split, read_text, run
from fabric.errors import ConfigError, DataValidationError
from fabric.tracking import digest_splits

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    return load_config(None, [f"run_dir={run_dir}", *overrides])


def _table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(50, 10, n).round(3)
    plan = rng.choice(["basic", "plus", "pro"], n)
    return pd.DataFrame(
        {
            "usage": x,
            "visits": rng.integers(0, 40, n),
            "plan": plan.astype(object),
            "churn": ((x > 55) ^ (plan == "pro")).astype("int64"),
        }
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same rows as one CSV, one JSON-lines file and a folder of two parquet files."""
    d = tmp_path_factory.mktemp("sources")
    df = _table()
    df.to_csv(d / "rows.csv", index=False)
    df.to_json(d / "rows.jsonl", orient="records", lines=True)
    (d / "pq").mkdir()
    df.iloc[:1700].to_parquet(d / "pq" / "a.parquet")
    df.iloc[1700:].to_parquet(d / "pq" / "b.parquet")
    (d / "pq" / "_SUCCESS").write_text("")
    return {"csv": d / "rows.csv", "json": d / "rows.jsonl", "parquet": d / "pq"}


def _rows(out_dir: Path, split: str) -> pd.DataFrame:
    df = read_split(out_dir, split).to_pandas()
    return df.sort_values(list(df.columns)).reset_index(drop=True)


# --------------------------------------------------------------------------- streaming (runs first: own Ray)

STREAM_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, ray
    from fabric.runtime import start_local_ray
    out, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    os.makedirs(f"{out}/src")
    nbytes = 0
    for i in range(4):
        t = pa.table({**{f"f{j}": rng.normal(size=n // 4) for j in range(10)}, "y": rng.integers(0, 2, n // 4)})
        nbytes += t.nbytes
        pq.write_table(t, f"{out}/src/part-{i}.parquet", row_group_size=25_000)
    store = 80 * 1024 * 1024
    start_local_ray(num_cpus=2, object_store_memory=store, include_dashboard=False, log_to_driver=False)
    assert nbytes > 1.3 * store, (nbytes, store)
    from fabric.config import load_config
    from fabric.data import read_split, run
    r = run(load_config(None, [f"run_dir={out}/runs", f"data.source={out}/src", "data.target=y"]))
    assert sum(r.rows.values()) == n, r.rows
    assert read_split(r.out_dir, "train").count() == r.rows["train"]
    print("STREAMED", nbytes // 2**20, "MiB through", store // 2**20, "MiB")
    """
)


def test_data_larger_than_the_object_store_streams_through(tmp_path: Path) -> None:
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "1300000"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        # Its own Ray: never the address of one another test or the shell may have left around.
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STREAMED" in proc.stdout


# --------------------------------------------------------------------------- the default dataset, end to end


def test_builtin_default_end_to_end(ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run(_cfg(tmp_path))
    out = r.out_dir
    assert out == (tmp_path / "data").resolve()
    assert sum(r.rows.values()) == 6366
    assert 0.66 < r.rows["train"] / 6366 < 0.74 and r.rows["val"] > 700 and r.rows["test"] > 700
    assert r.num_classes == 2 and r.class_names == ["0", "1"]
    assert {"occupation", "occupation_husb"} <= set(r.categorical or [])
    assert "occupation=student" in r.feature_names and "age" in r.feature_names

    # Splits: float32 features named as in feature_names, int64 labels 0..k-1, the counts reported.
    train = read_split(out, "train")
    schema = train.schema()
    assert list(schema.names) == [*r.feature_names, "label"]
    assert all(t == pa.float32() for t in schema.types[:-1]) and schema.types[-1] == pa.int64()
    tr = train.to_pandas()
    assert len(tr) == r.rows["train"] and set(tr["label"]) == {0, 1}
    for name in ("val", "test"):
        assert read_split(out, name).count() == r.rows[name]

    # Scaling was fitted on the training split only: exactly standardised there, not elsewhere.
    numeric = ["rate_marriage", "age", "yrs_married", "children", "religious", "educ"]
    assert np.abs(tr[numeric].mean()).max() < 1e-4
    assert np.abs(tr[numeric].std(ddof=0) - 1).max() < 1e-3
    va = read_split(out, "val").to_pandas()
    assert np.abs(va[numeric].mean()).max() > 1e-3

    meta = load_meta(out)
    assert meta["feature_names"] == r.feature_names and meta["rows"] == r.rows
    assert meta["input_columns"] == ["rate_marriage", "age", "yrs_married", "children", "religious", "educ",
                                     "occupation", "occupation_husb"]  # fmt: skip
    assert meta["task"] == "classification" and meta["num_classes"] == 2

    # The reference sample: raw training rows (it encodes to rows of the train split, none of val/test).
    ref = pd.read_parquet(out / "reference.parquet")
    assert len(ref) == 1000 and set(ref.columns) == {*meta["input_columns"], "target"}
    assert ref["occupation"].map(type).eq(str).all()
    pre = load_preprocessor(out / "preprocessor.json")
    encoded = np.column_stack([pre.transform(ref), ref["target"].to_numpy()]).round(4)

    def as_set(df: pd.DataFrame) -> set[tuple[float, ...]]:
        return set(map(tuple, df[[*r.feature_names, "label"]].to_numpy(dtype=np.float64).round(4)))

    train_rows, other_rows = as_set(tr), as_set(va) | as_set(read_split(out, "test").to_pandas())
    assert all(tuple(row) in train_rows for row in encoded)
    assert not any(tuple(row) in other_rows for row in encoded)

    stats = json.loads((out / "reference_stats.json").read_text())
    assert stats["rows"] == r.rows["train"]
    assert stats["columns"]["age"]["kind"] == "numeric" and stats["columns"]["age"]["count"] == r.rows["train"]
    assert stats["columns"]["age"]["quantiles"]["0.5"] > 0
    assert abs(sum(stats["columns"]["occupation"]["frequencies"].values()) - 1) < 1e-9

    printed = capsys.readouterr().out
    assert "6,366 rows" in printed and "train 4" in printed and "reference.parquet" in printed

    # Ingesting the same source again rewrites the folder (other file names, maybe another row order) with
    # the same rows: the content digest the training stage keys its runs by must not change.
    digest = digest_splits(r.out_dir)
    assert digest_splits(run(_cfg(tmp_path)).out_dir) == digest


# --------------------------------------------------------------------------- formats and determinism


def test_every_format_gives_the_same_split_and_fit(ray_local: None, tmp_path: Path, sources: dict[str, Path]) -> None:
    results = {}
    for fmt, path in sources.items():
        r = run(_cfg(tmp_path / fmt, f"data.source={path}", "data.target=churn"))
        results[fmt] = (r.rows, r.feature_names, _rows(r.out_dir, "val"))
    (rows, names, val) = results["csv"]
    assert names == ["usage", "visits", "plan=basic", "plan=plus", "plan=pro"]
    for fmt in ("json", "parquet"):
        assert results[fmt][0] == rows and results[fmt][1] == names
        pd.testing.assert_frame_equal(results[fmt][2], val, atol=1e-6)


def test_split_is_seeded(ray_local: None, tmp_path: Path, sources: dict[str, Path]) -> None:
    args = (f"data.source={sources['parquet']}", "data.target=churn")
    a = run(_cfg(tmp_path / "a", *args, "data.split.seed=1"))
    b = run(_cfg(tmp_path / "b", *args, "data.split.seed=1"))
    c = run(_cfg(tmp_path / "c", *args, "data.split.seed=2"))
    pd.testing.assert_frame_equal(_rows(a.out_dir, "test"), _rows(b.out_dir, "test"))
    assert pd.read_parquet(a.out_dir / "reference.parquet").equals(pd.read_parquet(b.out_dir / "reference.parquet"))
    assert not _rows(a.out_dir, "test").equals(_rows(c.out_dir, "test"))
    assert digest_splits(a.out_dir) == digest_splits(b.out_dir) != digest_splits(c.out_dir)


def test_regression_labels_are_float(ray_local: None, tmp_path: Path, sources: dict[str, Path]) -> None:
    r = run(_cfg(tmp_path, f"data.source={sources['parquet']}", "data.target=usage", "data.task=regression",
                 "data.scaling=minmax"))  # fmt: skip
    assert r.num_classes is None and r.class_names is None
    train = read_split(r.out_dir, "train")
    assert train.schema().types[-1] == pa.float32()
    tr = train.to_pandas()
    assert tr["label"].between(10, 100).all()
    assert tr["visits"].min() == 0.0 and tr["visits"].max() == 1.0  # min-max fitted on train


# --------------------------------------------------------------------------- failures stop before writing


def test_corrupt_csv_names_the_bad_rows(ray_local: None, tmp_path: Path) -> None:
    lines = _table(500).to_csv(index=False).splitlines()
    lines[40] += ",7,7"
    lines[300] = "12.5"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as e:
        run(_cfg(tmp_path / "runs", f"data.source={bad}", "data.target=churn"))
    assert e.value.rows == 2
    assert [x["line"] for x in e.value.examples] == [41, 301]
    assert e.value.examples[1]["text"] == "12.5"
    assert not (tmp_path / "runs" / "data").exists()


def test_broken_json_lines_and_parquet(ray_local: None, tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"a": 1, "y": 0}\n{"a": 2, "y": 1}\nnot json\n{"a": 3, "y": 1}\n[1, 2]\n')
    with pytest.raises(DataValidationError) as e:
        run(_cfg(tmp_path / "runs", f"data.source={jsonl}", "data.target=y"))
    assert e.value.rows == 2 and [x["line"] for x in e.value.examples] == [3, 5]
    truncated = tmp_path / "rows.parquet"
    _table(100).to_parquet(truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(DataValidationError, match="rows.parquet"):
        run(_cfg(tmp_path / "runs", f"data.source={truncated}", "data.target=churn"))
    assert not (tmp_path / "runs" / "data").exists()


def test_failed_expectations_stop_the_stage(ray_local: None, tmp_path: Path) -> None:
    df = _table()
    df.loc[[3, 1500, 2999], "usage"] = np.nan
    df.loc[[10, 20], "visits"] = 500
    df.loc[7, "plan"] = "enterprise"
    src = tmp_path / "rows.parquet"
    df.to_parquet(src)
    with pytest.raises(DataValidationError) as e:
        run(
            _cfg(
                tmp_path / "runs",
                f"data.source={src}",
                "data.target=churn",
                "data.expectations.not_null=[usage]",
                "data.expectations.ranges.visits.max=100",
                "data.expectations.allowed.plan=[basic, plus, pro]",
            )
        )
    err = e.value
    assert (err.column, err.rows) == ("usage", 3) and len(err.examples) == 3
    found = {(v["check"], v["column"], v["rows"]) for v in err.violations}
    assert found == {("not_null", "usage", 3), ("range", "visits", 2), ("allowed", "plan", 1)}
    assert "enterprise" in json.dumps(err.violations)
    assert not (tmp_path / "runs" / "data").exists()


def test_row_count_floor(ray_local: None, tmp_path: Path, sources: dict[str, Path]) -> None:
    with pytest.raises(DataValidationError, match="min_rows=5000"):
        run(_cfg(tmp_path, f"data.source={sources['csv']}", "data.target=churn", "data.expectations.min_rows=5000"))


def test_missing_target_column(ray_local: None, tmp_path: Path, sources: dict[str, Path]) -> None:
    with pytest.raises(DataValidationError, match="data.target") as e:
        run(_cfg(tmp_path, f"data.source={sources['json']}", "data.target=churned"))
    assert (e.value.column, e.value.rows) == ("churned", 3000)
    assert "usage, visits, plan, churn" in str(e.value) and len(e.value.examples) == 5


def test_text_deep_in_a_numeric_csv_column(ray_local: None, tmp_path: Path) -> None:
    # Arrow types columns from the first block of a CSV; a bad value past it must still be named.
    df = pd.concat([_table()] * 25, ignore_index=True).astype({"usage": object})
    df.loc[len(df) - 3, "usage"] = "n.a"
    df.loc[len(df) - 2, "usage"] = "??"
    src = tmp_path / "late.csv"
    df.to_csv(src, index=False)
    with pytest.raises(DataValidationError) as e:
        run(_cfg(tmp_path / "runs", f"data.source={src}", "data.target=churn"))
    assert (e.value.column, e.value.rows) == ("usage", 2)
    assert {x["usage"] for x in e.value.examples} == {"n.a", "??"}


def test_read_text_gives_a_text_column(ray_local: None, tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "corpus" / "b.txt").write_text("third line\n")
    (tmp_path / "corpus" / "_SUCCESS").write_text("")
    rows = read_text(str(tmp_path / "corpus")).take_all()
    assert sorted(r["text"] for r in rows) == ["first line", "second line", "third line"]
    with pytest.raises(ConfigError, match="data.format"):
        run(_cfg(tmp_path, f"data.source={tmp_path / 'corpus'}", "data.format=text"))


# --------------------------------------------------------------------------- the job entrypoint


def _job_main():
    spec = importlib.util.spec_from_file_location("jobs_ingest", ROOT / "jobs" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.main


def test_job_entrypoint(ray_local: None, tmp_path: Path, sources: dict[str, Path],
                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    main = _job_main()
    assert main([f"run_dir={tmp_path}", f"data.source={sources['csv']}", "data.target=churn"]) == 0
    assert (tmp_path / "data" / "meta.json").is_file()
    code = main([f"run_dir={tmp_path / 'b'}", f"data.source={sources['csv']}", "data.target=churn",
                 "data.expectations.ranges.visits.max=10"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "DataValidationError" in err and "visits" in err
    assert main([f"run_dir={tmp_path}", "data.split.train=0.9"]) == 2  # fractions no longer sum to 1
