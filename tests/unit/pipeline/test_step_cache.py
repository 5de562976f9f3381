"""The step cache's records, without Ray: keys, output stamps, --force, --no-cache and unreadable records."""

from __future__ import annotations

from pathlib import Path

from fabric.config import PipelineConfig
from fabric.data import IngestResult
from fabric.pipeline import StepCache, _stamp, stage_key


def _result(out: Path) -> IngestResult:
    return IngestResult(out_dir=out, feature_names=["a", "b"], num_classes=2, rows={"train": 3, "val": 1, "test": 1})


def test_a_record_counts_only_with_its_key_and_unchanged_outputs(tmp_path: Path) -> None:
    meta = tmp_path / "data" / "meta.json"
    meta.parent.mkdir()
    meta.write_text("{}")
    cache = StepCache(tmp_path)
    cache.put("ingest", "k1", _stamp(meta), _result(meta.parent))
    hit = cache.get("ingest", "k1", _stamp(meta), IngestResult)
    assert hit == _result(meta.parent) and isinstance(hit.out_dir, Path)
    assert cache.get("ingest", "k2", _stamp(meta), IngestResult) is None  # another key
    meta.write_text('{"rewritten": true}')
    assert cache.get("ingest", "k1", _stamp(meta), IngestResult) is None  # the outputs changed since
    meta.unlink()
    assert _stamp(meta) == "" and cache.get("ingest", "k1", "", IngestResult) is None  # outputs gone


def test_force_no_cache_and_bad_records_run_the_stage(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    StepCache(tmp_path).put("ingest", "k", _stamp(meta), _result(tmp_path))
    assert StepCache(tmp_path, force=("ingest",)).get("ingest", "k", _stamp(meta), IngestResult) is None
    assert StepCache(tmp_path, enabled=False).get("ingest", "k", _stamp(meta), IngestResult) is None
    (tmp_path / "steps" / "ingest.json").write_text("{not json")
    assert StepCache(tmp_path).get("ingest", "k", _stamp(meta), IngestResult) is None
    (tmp_path / "steps" / "ingest.json").write_text('{"key": "k", "stamp": "%s", "result": {"old": 1}}' % _stamp(meta))
    assert StepCache(tmp_path).get("ingest", "k", _stamp(meta), IngestResult) is None  # an older format


def test_keys_follow_their_sections_and_inputs() -> None:
    base = PipelineConfig()
    quantized = PipelineConfig.model_validate({"export": {"quantize": not base.export.quantize}})
    assert stage_key("export", base, model="m/1") != stage_key("export", quantized, model="m/1")
    assert stage_key("ingest", base, source="d1") == stage_key("ingest", quantized, source="d1")
    assert stage_key("ingest", base, source="d1") != stage_key("ingest", base, source="d2")
    assert stage_key("tune", base, data="s1") != stage_key("tune", base, data="s2")


def test_the_cli_names_the_cached_stages() -> None:
    from fabric.cli import run as run_cli
    from fabric.pipeline import CACHED_STAGES

    assert run_cli._STAGES == CACHED_STAGES
