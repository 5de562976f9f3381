"""fabric.storage: local paths behave as plain paths; URIs go through pyarrow to a real S3 API (moto's server on
127.0.0.1, no Ray)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric import storage
from fabric.errors import FabricError
from tests.moto_s3 import moto_s3

BUCKET = "storage-unit"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 API on a free loopback port with one bucket; yields its URI prefix."""
    with moto_s3(BUCKET, cache_dir=tmp_path_factory.mktemp("cache")):
        yield f"s3://{BUCKET}"


def test_local_paths_are_plain_paths(tmp_path: Path) -> None:
    assert not storage.is_uri(tmp_path) and storage.is_uri("s3://b/p") and not storage.is_uri("file:///x")
    assert storage.join(tmp_path, "steps", "a.json") == str(tmp_path / "steps" / "a.json")
    assert storage.local_root(tmp_path) == tmp_path.resolve()
    target = storage.join(tmp_path, "steps", "a.json")
    assert not storage.exists(target) and storage.stamp(target) == ""
    storage.write_text(target, "one")
    assert storage.read_text(target) == "one" and storage.exists(target)
    info = (tmp_path / "steps" / "a.json").stat()
    assert storage.stamp(target) == f"a.json:{info.st_size}:{info.st_mtime_ns}"
    assert storage.pull(tmp_path, "data", "meta.json") == tmp_path / "data"
    storage.publish(tmp_path, "data")  # nothing to do
    storage.check(tmp_path)


def test_uri_join_keeps_the_scheme() -> None:
    assert storage.join("s3://b/run/", "train", "/model") == "s3://b/run/train/model"


def test_a_uri_run_dir_has_a_local_copy_per_uri(s3: str) -> None:
    a, b = storage.local_root(f"{s3}/a"), storage.local_root(f"{s3}/b")
    assert a != b and a.parent == b.parent == Path(os.environ["FABRIC_CACHE_DIR"]) / "run_dirs"


def test_files_and_folders_round_trip_through_the_bucket(s3: str) -> None:
    run = f"{s3}/round-trip"
    storage.check(run)
    storage.write_text(f"{run}/steps/x.json", "{}")
    assert storage.read_text(f"{run}/steps/x.json") == "{}"
    assert storage.stamp(f"{run}/steps/x.json").startswith("x.json:2:")
    local = storage.local_root(run) / "data"
    (local / "train").mkdir(parents=True)
    (local / "train" / "part.parquet").write_bytes(b"rows")
    (local / "meta.json").write_text("v1")
    storage.publish(run, "data", last="meta.json")
    assert storage.exists(f"{run}/data/train/part.parquet")

    (local / "meta.json").write_text("stale")
    (local / "train" / "part.parquet").unlink()
    assert storage.pull(run, "data", "meta.json") == local  # the marker differs: the bucket's copy comes down
    assert (local / "meta.json").read_text() == "v1" and (local / "train" / "part.parquet").read_bytes() == b"rows"

    (local / "extra").write_text("kept while the marker matches")
    storage.pull(run, "data", "meta.json")
    assert (local / "extra").is_file()
    assert storage.pull(run, "nothing-here", "meta.json") == storage.local_root(run) / "nothing-here"

    shutil.rmtree(storage.local_root(run))  # another machine: no local copy at all
    assert (storage.pull(run, "data", "meta.json") / "train" / "part.parquet").read_bytes() == b"rows"
    shutil.rmtree(storage.local_root(run))
    assert storage.fetch(run, "data/meta.json").read_text() == "v1"  # one file, not the folder
    assert not (local / "train").exists()
    (local / "gone.json").write_text("stale")
    assert not storage.fetch(run, "data/gone.json").exists()  # not in the bucket: no stale copy is used
    # The fetched marker alone (as the monitor fetches meta.json) is no whole copy: the folder comes down.
    assert (storage.pull(run, "data", "meta.json") / "train" / "part.parquet").read_bytes() == b"rows"
    assert not storage.exists(f"{run}/data/{storage.COPY_STAMP}")  # the stamp is the local copy's own


def test_a_missing_bucket_fails_in_one_line_naming_it(s3: str) -> None:
    with pytest.raises(FabricError) as e:
        storage.check("s3://no-such-bucket-here/run")
    message = str(e.value)
    assert "\n" not in message and message.startswith("run_dir s3://no-such-bucket-here/run is not writable: ")
    assert "bucket does not exist" in message


def test_wrong_keys_and_an_unreachable_endpoint_fail_in_one_line(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against an S3 API that checks keys (moto's server enforcing auth from the first request), and one that is
    not there: one line naming the URI and the cause, before any work."""
    import socket
    import subprocess
    import sys
    import time

    from fabric.runtime import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
                time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        with pytest.raises(FabricError) as e:
            storage.check("s3://guarded/run")
        assert str(e.value).startswith("run_dir s3://guarded/run is not writable: ")
        assert "INVALID_ACCESS_KEY_ID" in str(e.value) and "\n" not in str(e.value)
    finally:
        server.terminate()
        server.wait(timeout=30)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(FabricError) as e:
        storage.check("s3://unreachable/run")
    assert str(e.value).startswith("run_dir s3://unreachable/run is not writable: ")
    assert "Could not connect" in str(e.value) and "\n" not in str(e.value)


def test_a_folder_in_a_bucket_is_copied_to_this_machine_once_per_version(s3: str, tmp_path: Path) -> None:
    assert storage.localize(tmp_path / "model") == (tmp_path / "model").resolve()  # a local folder is itself
    run = f"{s3}/localize"
    source = storage.local_root(run) / "model"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "weights.bin").write_bytes(b"v1")
    storage.publish(run, "model")
    local = storage.localize(f"{run}/model")
    assert local == storage.cache_path(f"{run}/model") and (local / "weights.bin").read_bytes() == b"v1"
    (local / "mine").write_text("a copy the bucket has not changed since is used as it is")
    assert storage.localize(f"{run}/model") == local and (local / "mine").is_file()

    (source / "weights.bin").write_bytes(b"v2, longer")
    storage.publish(run, "model")  # a new version: the copy is replaced whole
    assert (storage.localize(f"{run}/model") / "weights.bin").read_bytes() == b"v2, longer"
    assert not (local / "mine").exists()
    with pytest.raises(FabricError, match=f"{run}/nothing: no files there"):
        storage.localize(f"{run}/nothing")


def test_the_language_model_stages_find_their_folders_in_a_uri_run_dir(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabric.config import PipelineConfig
    from fabric.errors import UsageError
    from fabric.serve.llm.app import model_folder, on_this_node, resolved
    from fabric.train import llm_dir

    run = f"{s3}/llm-run"
    adapters = {"ft": f"{run}/llm/adapter"}
    cfg = PipelineConfig.model_validate({"run_dir": run, "llm": {"serve": {"adapters": adapters}}})
    assert llm_dir(cfg) == storage.local_root(run) / "llm"
    assert model_folder(cfg) == f"{run}/llm/base"  # nothing merged in the bucket
    with pytest.raises(UsageError, match=f"no Hugging Face model folder at {run}/llm/base"):
        resolved(cfg)
    local = storage.local_root(run) / "llm"
    for folder, marker in (("base", "config.json"), ("merged", "config.json"), ("adapter", "adapter_config.json")):
        (local / folder).mkdir(parents=True)
        (local / folder / marker).write_text("{}")
        storage.publish(run, f"llm/{folder}")
    assert model_folder(cfg) == f"{run}/llm/merged"
    serve = resolved(cfg)
    assert serve["model_path"] == f"{run}/llm/merged" and serve["adapters"] == adapters
    # a replica's copies, on its own node
    here = on_this_node(cfg.llm.serve.model_copy(update={"model_path": serve["model_path"], "adapters": adapters}))
    assert here.model_path == str(storage.cache_path(f"{run}/llm/merged"))
    assert (Path(here.adapters["ft"]) / "adapter_config.json").is_file()

    from fabric.runtime import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    served = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"serve": cfg.llm.serve.model_copy(
        update={"model_path": f"{run}/llm/merged"})})})  # fmt: skip
    with pytest.raises(UsageError) as e:
        resolved(served)
    assert str(e.value).startswith(f"llm.serve.model_path: cannot read {run}/llm/merged: ")
    assert "Could not connect" in str(e.value) and "\n" not in str(e.value)


def test_a_model_folder_in_a_bucket_resolves_and_other_uris_stay_mlflows(s3: str, tmp_path: Path) -> None:
    from fabric.config import PipelineConfig
    from fabric.errors import UsageError
    from fabric.tracking import resolve_model

    run = f"{s3}/model-uri"
    folder = storage.local_root(run) / "model"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text('{"builder": "mlp"}')
    (folder / "model.pt").write_bytes(b"weights")
    storage.publish(run, "model")
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run")})
    local = resolve_model(f"{run}/model", cfg)
    assert (local / "model.pt").read_bytes() == b"weights" and local != folder
    # a URI pyarrow cannot open is MLflow's to resolve: its error, one line, never pyarrow's
    with pytest.raises(UsageError, match="cannot download mlflow-artifacts://"):
        resolve_model("mlflow-artifacts://nowhere/model", cfg)
    with pytest.raises(UsageError, match="cannot download http://127.0.0.1:9/model"):
        resolve_model("http://127.0.0.1:9/model", cfg)
