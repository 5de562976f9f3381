"""Batch scoring without Ray: input checks, the bad-row report, output naming and staging, the scoring actor's
batch function on a real ONNX graph, the pool's sizing, and the CLI's argument errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from fabric.cli import main
from fabric.config import PipelineConfig, load_config
from fabric.config.data import Expectations
from fabric.config.predict import PredictConfig
from fabric.data import Preprocessor
from fabric.errors import ConfigError, DataValidationError, UsageError
from fabric.predict import score
from fabric.predict._tabular import (
    BadRows,
    InputRules,
    Output,
    Scorer,
    ScoringModel,
    _file_bad_rows,
    check_frame,
    input_rules,
    missing_columns,
    output_format,
    Staging,
    score_block,
    task_size,
)
from tests.unit.serve.models import PREPROCESSOR, encode, make_model, reference, softmax


def _rules(**predict: object) -> InputRules:
    expectations = Expectations.model_validate(
        {"not_null": ["city"], "ranges": {"age": {"min": 0, "max": 120}}, "allowed": {"city": ["oslo", "paris"]}}
    )
    pre = Preprocessor.from_dict(PREPROCESSOR)  # age numeric, never null in training; income nullable
    return input_rules(pre, [], PredictConfig.model_validate({"keep_columns": ["id"], **predict}), expectations)


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [10, 11, 12, 13, 14, 15],
            "age": [30, None, "old", 150, 40, 41],
            "income": [1.0, None, 2.0, 3.0, 4.0, 5.0],
            "city": ["oslo", "paris", "oslo", "oslo", None, "rome"],
        }
    )


def test_checks_name_each_bad_row_column_and_reason() -> None:
    found = check_frame(_rows(), _rules())
    findings = {(f.column, f.why.split(" (")[0]): np.flatnonzero(f.mask).tolist() for f in found}
    assert findings == {
        ("age", "null, and the training data had none in this column"): [1],
        ("age", "not a number"): [2],
        ("age", "outside [0, 120]"): [3],
        ("city", "null"): [4],  # data.expectations.not_null, reported once
        ("city", "not in data.expectations.allowed ['oslo', 'paris']"): [5],
    }
    # a null income is fine (training had nulls there); impute_nulls accepts the null age too
    imputed = {f.column for f in check_frame(_rows().iloc[[1]], _rules(impute_nulls=True))}
    assert imputed == set()
    assert check_frame(_rows().iloc[[0]], _rules()) == []


def test_missing_columns_include_kept_ones() -> None:
    assert missing_columns(["age", "income"], _rules()) == ["city", "id"]


def test_bad_row_report_numbers_rows_and_merges() -> None:
    rules = _rules()
    df = _rows()
    first = BadRows().add(df, check_frame(df, rules), rules.keep, limit=3, where={"file": "a.csv"}, offset=100)
    assert first.rows == 5 and len(first.examples) == 3
    assert first.examples[0] == {
        "file": "a.csv", "row": 102, "column": "age", "value": None,
        "problem": "null, and the training data had none in this column", "id": 11,
    }  # fmt: skip
    assert [e["row"] for e in first.examples] == [102, 103, 104]
    second = BadRows().add(df.iloc[[5]].reset_index(drop=True), check_frame(df.iloc[[5]], rules), rules.keep, 3)
    merged = first.merge(second, limit=3)
    assert merged.rows == 6 and len(merged.examples) == 3
    err = merged.error("in.csv (csv, 1 file)", "out.parquet")
    assert isinstance(err, DataValidationError) and err.rows == 6 and err.column == "age"
    text = str(err)
    assert "in.csv (csv, 1 file): 6 row(s) fail the model's input checks; nothing was written to out.parquet" in text
    assert "column 'city', 2 row(s): not in data.expectations.allowed ['oslo', 'paris']" in text
    assert "'row': 104" in text


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_bad_rows_found_deep_in_a_file_by_row_number(tmp_path: Path, fmt: str) -> None:
    n = 200_000  # past the first block of a CSV reader, whose types a later stray string would break
    df = pd.DataFrame({"id": np.arange(n), "age": np.full(n, 30.0), "income": 1.0, "city": "oslo"})
    df["age"] = df["age"].astype(object)
    df.loc[150_000, "age"] = "old"
    df.loc[190_000, "city"] = None
    path = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.astype({"age": str}).to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    found = _file_bad_rows(pafs.LocalFileSystem(), str(path), fmt, _rules(), limit=5)
    assert found.rows == 2 and not found.errors
    rows = [(e["row"], e["column"], e["id"]) for e in found.examples]
    assert rows == [(150_001, "age", 150_000), (190_001, "city", 190_000)]


def test_output_format_and_staging(tmp_path: Path) -> None:
    assert output_format("s.csv") == "csv" and output_format("S.CSV/") == "csv"
    assert output_format("s.parquet") == "parquet" and output_format("scored") == "parquet"
    assert output_format("s.csv", "parquet") == "parquet"
    out = Output(str(tmp_path / "scored.parquet"))
    staging = Path(out.staging)
    assert staging.parent == tmp_path and staging.name.startswith(".scored.parquet.partial-")  # hidden sibling
    staging.mkdir()
    pd.DataFrame({"a": [1, 2, 3]}).to_parquet(staging / "part-0.parquet")
    pd.DataFrame({"a": [4]}).to_parquet(staging / "part-1.parquet")
    pd.DataFrame({"a": [5]}).to_parquet(staging / "part-2.parquet")  # a retried block's first attempt
    out.keep_only({str(staging / "part-0.parquet"), str(staging / "part-1.parquet")})
    assert not out.exists()
    out.publish(overwrite=False)
    assert out.exists() and not staging.exists() and len(pd.read_parquet(tmp_path / "scored.parquet")) == 4

    again = Output(str(tmp_path / "scored.parquet"))
    Path(again.staging).mkdir()
    pd.DataFrame({"a": [9]}).to_csv(Path(again.staging) / "p.csv", index=False)
    with pytest.raises(UsageError, match="appeared while scoring"):
        again.publish(overwrite=False)
    again.publish(overwrite=True)
    assert [p.name for p in (tmp_path / "scored.parquet").iterdir()] == ["p.csv"]
    gone = Output(str(tmp_path / "x"))
    Path(gone.staging).mkdir()
    gone.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet"]


def test_tasks_share_the_cpus() -> None:
    assert task_size(None, 2) == (2, 1)
    assert task_size(None, 1) == (1, 1)
    assert task_size(4, 16) == (4, 4)
    assert task_size(4, 2) == (4, 1)


def _model(folder: Path, task: str = "classification", classes: list[str] | None = None) -> ScoringModel:
    import json

    make_model(folder, task=task, num_classes=3)
    return ScoringModel(
        name="tiny",
        version="7",
        task=task,
        feature_names=json.loads((folder / "model.json").read_text())["feature_names"],
        onnx=(folder / "model.onnx").read_bytes(),
        preprocessor=PREPROCESSOR,
        class_names=classes,
    )


def test_scorer_batch_matches_the_model_and_keeps_ids(tmp_path: Path) -> None:
    model = _model(tmp_path / "m", classes=["low", "mid", "high"])
    rows = [
        {"id": "a", "age": 30, "income": 10.0, "city": "oslo"},
        {"id": "b", "age": 55, "income": None, "city": None},
    ]
    rules = InputRules(columns=("age", "income", "city"), keep=("id",), numeric=frozenset({"age", "income"}))
    scorer = Scorer(model, rules, threads=1, limit=5)  # nullable None: nulls are filled as in training
    out = scorer.score(pa.Table.from_pylist(rows)).to_pandas()
    want = softmax(reference(tmp_path / "m", encode(rows)))
    assert list(out.columns) == [
        "id", "prediction", "label", "proba_0", "proba_1", "proba_2", "model_name", "model_version"
    ]  # fmt: skip
    assert out["id"].tolist() == ["a", "b"]
    np.testing.assert_allclose(out[["proba_0", "proba_1", "proba_2"]].to_numpy(), want, atol=1e-5)
    assert out["prediction"].tolist() == want.argmax(axis=1).tolist()
    assert out["label"].tolist() == [["low", "mid", "high"][k] for k in want.argmax(axis=1)]
    assert set(out["model_name"]) == {"tiny"} and set(out["model_version"]) == {"7"}


def test_scorer_regression_and_bad_batch(tmp_path: Path) -> None:
    model = _model(tmp_path / "r", task="regression")
    scorer = Scorer(model, _rules(), threads=1, limit=5)
    rows = [{"id": 1, "age": 30, "income": 10.0, "city": "oslo"}]
    out = scorer.score(pa.Table.from_pylist(rows)).to_pandas()
    assert list(out.columns) == ["id", "prediction", "model_name", "model_version"]
    assert out["prediction"].iloc[0] == pytest.approx(float(reference(tmp_path / "r", encode(rows))[0, 0]), abs=1e-5)
    with pytest.raises(DataValidationError, match="'age', 1 row"):
        scorer.score(pa.Table.from_pylist([*rows, {"id": 2, "age": None, "income": 1.0, "city": "oslo"}]))


def test_predict_config_rejects_two_selectors_and_clashing_columns() -> None:
    with pytest.raises(ConfigError, match="version or alias, not both"):
        load_config(None, ["predict.version=2", "predict.alias=candidate"])
    with pytest.raises(ConfigError, match="clash"):
        load_config(None, ["predict.keep_columns=[id, proba_0]"])


def test_score_refuses_bad_arguments_before_any_work(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path)})
    with pytest.raises(UsageError, match="give --input and --output"):
        score(cfg, None, str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="exists"):
        score(cfg, "builtin:wine", str(tmp_path / "out"))
    with pytest.raises(UsageError, match="choose one"):
        score(cfg, "builtin:wine", str(tmp_path / "new"), version=1, alias="champion")


def test_cli_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["predict", f"run_dir={tmp_path}", "--input", "x.csv", "--output", str(out)]) == 2
    assert "exists; choose another path or set predict.overwrite=true" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", "--input", "x.csv", "--output", "o", "--version", "1", "--alias", "candidate"])
    assert e.value.code == 2
    assert main(["predict", "--input", "x.csv", "--output", str(tmp_path / "o"), "--version", "0"]) == 2
    assert "--version must be 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_block_becomes_one_file_of_batches(tmp_path: Path, fmt: str) -> None:
    model = _model(tmp_path / "m", classes=["low", "mid", "high"])
    rules = InputRules(columns=("age", "income", "city"), keep=("id",), numeric=frozenset({"age", "income"}))
    kwargs = {"model": model, "rules": rules, "threads": 1, "limit": 5}
    rows = [{"id": i, "age": 20 + i, "income": float(i), "city": ["oslo", "paris", None][i % 3]} for i in range(7)]
    block = pa.Table.from_pylist(rows)
    staging = Staging(pafs.LocalFileSystem(), str(tmp_path / "out"), fmt)
    (tmp_path / "out").mkdir()
    done = score_block(block, key="k1", scorer=kwargs, staging=staging, batch_size=3).to_pylist()
    assert len(done) == 1 and done[0]["rows"] == 7 and done[0]["file"].endswith(f".{fmt}")
    want = Scorer(**kwargs).score(block).to_pandas()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(done[0]["file"])
        assert f.metadata.num_row_groups == 3  # batches of 3, 3 and 1 rows
        pd.testing.assert_frame_equal(f.read().to_pandas(), want)
    else:
        got = pd.read_csv(done[0]["file"])
        assert got["id"].tolist() == list(range(7)) and got["label"].tolist() == want["label"].tolist()
        np.testing.assert_allclose(got["proba_0"], want["proba_0"])
    assert score_block(block.slice(0, 0), key="k1", scorer=None, staging=staging, batch_size=3).num_rows == 0
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_a_model_without_preprocessor_reads_its_features_raw(tmp_path: Path) -> None:
    from dataclasses import replace

    model = replace(_model(tmp_path / "m"), preprocessor=None)
    features = model.feature_names  # age, income, city=oslo, city=paris: already encoded
    rules = InputRules(columns=tuple(features), numeric=frozenset(features), nullable=frozenset())
    x = np.array([[0.5, -1.0, 1.0, 0.0], [2.0, 0.25, 0.0, 1.0]], dtype=np.float32)
    table = pa.table({f: pa.array(x[:, j].astype(np.float64)) for j, f in enumerate(features)})
    out = Scorer(model, rules, threads=1, limit=5).score(table).to_pandas()
    want = softmax(reference(tmp_path / "m", x))
    np.testing.assert_allclose(out[["proba_0", "proba_1", "proba_2"]].to_numpy(), want, atol=1e-5)
