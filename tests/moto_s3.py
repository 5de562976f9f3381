"""A real S3 API for tests: moto's server on a free loopback port, reached the standard way (AWS_ENDPOINT_URL and
dummy keys in the environment, which a local Ray started afterwards hands to its workers)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def moto_s3(*buckets: str, cache_dir: Path) -> Iterator[Any]:
    """moto's S3 server, the AWS variables pointing at it, ``FABRIC_CACHE_DIR`` at ``cache_dir`` and the empty
    ``buckets``; yields a boto3 S3 client. The server stops and every variable is restored afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FABRIC_CACHE_DIR": str(cache_dir),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix`` in ``bucket``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def forget_local_copy(run_dir: str) -> Path:
    """Delete the local copy of the URI ``run_dir`` but the registry's database, as on a machine that never ran
    the run; returns the local copy's folder."""
    from fabric import storage

    root = storage.local_root(run_dir)
    for child in root.iterdir():
        if child.name != "mlflow.db":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return root
