"""Where a run's files live: a local folder, or any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://…``).

``run_dir`` may be either. Local paths behave exactly as plain paths. With a URI, the run's files live in the
bucket, and the driver works on a local copy of the folders it reads or writes (:func:`local_root`, one per URI
under ``$FABRIC_CACHE_DIR`` or ``~/.cache/fabric``): a stage pulls what it reads (:func:`pull`), writes its outputs
locally and publishes them (:func:`publish`). Ray Train and Ray Tune get the URI itself as their ``storage_path``:
their workers upload checkpoints and experiment state through pyarrow, so no shared disk is needed for them; a
worker or a replica that reads a folder of the run (a model, an adapter) copies it onto its own node
(:func:`localize`).

Credentials and endpoint come the usual ways of each filesystem (``AWS_ACCESS_KEY_ID`` / ``~/.aws``,
``AWS_ENDPOINT_URL`` for an S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``), never from fabric's config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fabric.errors import FabricError

if TYPE_CHECKING:
    from pyarrow import fs as pafs

log = logging.getLogger(__name__)

_CHECKED: set[str] = set()
COPY_STAMP = ".fabric-copy"
"""In a local copy's folder: the text of the stage's finished marker of the bucket folder it is a whole copy of
(written by :func:`pull` after a download and by :func:`publish` after an upload). A folder that :func:`fetch`
put single files into, the marker among them, is not a whole copy."""


def is_uri(location: str | Path) -> bool:
    """True for a filesystem URI such as ``s3://bucket/prefix`` (``file://`` URIs count as local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *parts: str) -> str:
    """``base/part/…``: a URI stays a URI (no ``Path`` collapsing its ``//``); a local path is made absolute."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(_local(base)).joinpath(*parts))


def _local(location: str | Path) -> Path:
    text = str(location)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    from pyarrow import fs

    if not is_uri(location):
        return fs.LocalFileSystem(), str(_local(location))
    try:
        return fs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as e:
        raise FabricError(f"{location}: {_cause(e)}") from e


def _cause(e: BaseException) -> str:
    """The first line of an error, without pyarrow's file:line prefix."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r" \(Request ID: [^)]*\)", "", line.split(". Detail: ")[0])


def local_root(run_dir: str | Path) -> Path:
    """The local folder of ``run_dir``: the path itself, or for a URI the local working copy keyed by the URI."""
    if not is_uri(run_dir):
        return _local(run_dir)
    base = Path(os.environ.get("FABRIC_CACHE_DIR") or "~/.cache/fabric").expanduser()
    uri = str(run_dir).rstrip("/")
    readable = "".join(c if c.isalnum() or c in "-_." else "-" for c in uri.split("://", 1)[1])[-60:]
    return base / "run_dirs" / f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


def makedirs(location: str | Path) -> None:
    """Create the folder at ``location`` (object stores need none: their folders are key prefixes)."""
    if not is_uri(location):
        _local(location).mkdir(parents=True, exist_ok=True)


def cache_path(key: str) -> Path:
    """A local path for a copy of the remote file or folder ``key`` names (a URI, or a filesystem's path)."""
    base = Path(os.environ.get("FABRIC_CACHE_DIR") or "~/.cache/fabric").expanduser()
    name = key.rstrip("/").rsplit("/", 1)[-1]
    return base / "fetched" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{name}"


def exists(location: str | Path) -> bool:
    """Whether a file or folder is at ``location``."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    return filesys.get_file_info(path).type != fs.FileType.NotFound


def size(location: str | Path) -> int:
    """Bytes of the file at ``location``, or of every file under the folder there (0 when nothing is there)."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    info = filesys.get_file_info(path)
    if info.type == fs.FileType.File:
        return int(info.size or 0)
    if info.type != fs.FileType.Directory:
        return 0
    found = filesys.get_file_info(fs.FileSelector(path, recursive=True))
    return sum(int(f.size or 0) for f in found if f.type == fs.FileType.File)


def read_text(location: str | Path) -> str:
    """The text of the file at ``location`` (OSError when it is missing)."""
    filesys, path = filesystem(location)
    with filesys.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | Path, text: str) -> None:
    """Write a file whole: a reader sees the old content or the new one (a local file is replaced atomically,
    an object store's PUT is atomic)."""
    if not is_uri(location):
        path = _local(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    filesys, path = filesystem(location)
    with filesys.open_output_stream(path) as f:
        f.write(text.encode())


def stamp(*locations: str | Path) -> str:
    """What files look like now (name, size and modification time of each); "" when one is missing."""
    from pyarrow import fs

    out = []
    for location in locations:
        filesys, path = filesystem(location)
        info = filesys.get_file_info(path)
        if info.type != fs.FileType.File:
            return ""
        mtime = info.mtime_ns if info.mtime_ns is not None else ""
        out.append(f"{info.base_name}:{info.size}:{mtime}")
    return ";".join(out)


def files(location: str | Path) -> list[str]:
    """The files under the folder at ``location`` (recursively, sorted), as paths of its filesystem; [] when
    there is no such folder."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    if filesys.get_file_info(path).type != fs.FileType.Directory:
        return []
    found = filesys.get_file_info(fs.FileSelector(path, recursive=True))
    return sorted(f.path for f in found if f.type == fs.FileType.File)


def delete(location: str | Path) -> None:
    """Delete the file or folder at ``location``; nothing to do when nothing is there."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    kind = filesys.get_file_info(path).type
    if kind == fs.FileType.Directory:
        filesys.delete_dir(path)
    elif kind == fs.FileType.File:
        filesys.delete_file(path)


def move(source: str | Path, dest: str | Path) -> None:
    """Move the folder at ``source`` to ``dest`` (on one filesystem): a rename locally, a server-side copy and
    delete of each object in a bucket (object stores cannot rename a prefix)."""
    filesys, src = filesystem(source)
    _, dst = filesystem(dest)
    if not is_uri(source):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        filesys.move(src, dst)
        return
    for path in files(source):
        filesys.move(path, f"{dst}/{path[len(src):].lstrip('/')}")
    delete(source)


def publish(run_dir: str | Path, sub: str, last: str | None = None, written: tuple[str, ...] = ()) -> None:
    """Upload the local copy of ``<run_dir>/<sub>`` (a folder or a file) over what the URI holds there; nothing
    to do for a local run_dir.

    Args:
        run_dir: a local path or a URI.
        sub: the folder or file under ``run_dir``.
        last: a file of the folder uploaded after all the others (the stage's "finished" marker, see :func:`pull`).
        written: subfolders of ``sub`` the stage's tasks wrote to the bucket themselves: neither uploaded nor
            replaced (the stage cleared the folder before writing them).
    """
    if not is_uri(run_dir):
        return
    from pyarrow import fs

    source = local_root(run_dir) / sub
    filesys, dest = filesystem(join(run_dir, sub))
    if source.is_file():
        fs.copy_files(str(source), dest, fs.LocalFileSystem(), filesys)
        return
    if not written and filesys.get_file_info(dest).type == fs.FileType.Directory:
        filesys.delete_dir_contents(dest)  # a previous run's outputs are replaced as a whole, never mixed
    uploads = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and p.relative_to(source).parts[0] not in written and p.name != COPY_STAMP
    )
    uploads.sort(key=lambda p: p.relative_to(source).as_posix() == last)
    for f in uploads:
        fs.copy_files(str(f), f"{dest}/{f.relative_to(source).as_posix()}", fs.LocalFileSystem(), filesys)
    if last is not None and (source / last).is_file():
        (source / COPY_STAMP).write_text((source / last).read_text())
    log.debug(f"published {source} to {join(run_dir, sub)}")


def pull(run_dir: str | Path, sub: str, marker: str | None = None) -> Path:
    """The local folder of ``<run_dir>/<sub>``; for a URI, first made a copy of the bucket's when it differs.

    Args:
        run_dir: a local path or a URI.
        sub: the folder under ``run_dir``.
        marker: a file in the folder written last by its stage: the local copy is current while it is a whole copy
            (see :data:`COPY_STAMP`) and its marker's text equals the bucket's (one small read instead of a
            listing); None: download when there is no local copy.
    """
    local = local_root(run_dir) / sub
    if not is_uri(run_dir):
        return local
    remote = join(run_dir, sub)
    if marker is not None:
        try:
            theirs = read_text(join(remote, marker))
        except OSError:
            return local  # nothing published there yet
        if _whole_copy(local, marker, theirs):
            return local
    elif local.exists() or not exists(remote):
        return local
    download(remote, local)
    if marker is not None:
        (local / COPY_STAMP).write_text(theirs)
    return local


def _whole_copy(local: Path, marker: str, text: str) -> bool:
    """``local`` is a whole copy of the bucket folder whose ``marker`` reads ``text``, and its own marker (which a
    stage rewrites before publishing) still reads the same."""
    stamp, mine = local / COPY_STAMP, local / marker
    return stamp.is_file() and mine.is_file() and stamp.read_text() == text == mine.read_text()


def fetch(run_dir: str | Path, sub: str) -> Path:
    """The local path of the file ``<run_dir>/<sub>``; for a URI, first downloaded from the bucket into the local
    copy (a missing object leaves no stale local file behind: callers check ``is_file()``).

    One file, not a folder: a replica or the monitor reads a run's small files without pulling its splits.
    """
    local = local_root(run_dir) / sub
    if not is_uri(run_dir):
        return local
    from pyarrow import fs

    filesys, path = filesystem(join(run_dir, sub))
    if filesys.get_file_info(path).type != fs.FileType.File:
        local.unlink(missing_ok=True)
        return local
    return download(join(run_dir, sub), local)


def download(location: str | Path, local: Path) -> Path:
    """Copy the folder (or file) at ``location`` to ``local``, replacing what was there."""
    from pyarrow import fs

    filesys, path = filesystem(location)
    staging = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    if filesys.get_file_info(path).type == fs.FileType.Directory:
        staging.mkdir()  # pyarrow creates a folder's subfolders, not the folder itself
    fs.copy_files(path, str(staging), filesys, fs.LocalFileSystem())
    if local.is_dir():
        shutil.rmtree(local)
    elif local.exists():
        local.unlink()
    staging.rename(local)
    return local


def localize(location: str | Path) -> Path:
    """The folder at ``location`` on this machine: a local path itself; for a URI, a copy under :func:`cache_path`,
    downloaded unless it was made of the bucket's current files (their names, sizes and modification times: one
    listing). For what a worker or a replica reads on its own node (a model folder, an adapter).

    Raises:
        FabricError: no files at the URI.
    """
    if not is_uri(location):
        return _local(location)
    from filelock import FileLock
    from pyarrow import fs

    filesys, path = filesystem(location)
    found = filesys.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = "\n".join(
        sorted(f"{f.path[len(path):]}\t{f.size}\t{f.mtime_ns}" for f in found if f.type == fs.FileType.File)
    )
    if not listing:
        raise FabricError(f"{location}: no files there")
    local = cache_path(str(location))
    seen = local.with_name(f".{local.name}.listing")
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local.with_name(f".{local.name}.lock"))):  # replicas on one node: one download, whole
        if not (local.is_dir() and seen.is_file() and seen.read_text() == listing):
            download(location, local)
            seen.write_text(listing)
            log.debug(f"downloaded {location} to {local}")
    return local


def check(run_dir: str | Path) -> None:
    """Fail early, in one line naming the URI and the cause, when ``run_dir`` is a URI that cannot be written
    (no such bucket, no credentials, no permission, no endpoint); a local path passes unchecked.

    A probe object is written and deleted once per process and URI.

    Raises:
        FabricError: ``run_dir <uri> is not writable: <cause>``.
    """
    if not is_uri(run_dir) or str(run_dir) in _CHECKED:
        return
    probe = join(run_dir, f".fabric-probe-{uuid.uuid4().hex[:8]}")
    try:
        filesys, path = filesystem(probe)
        with filesys.open_output_stream(path) as f:
            f.write(b"")
        filesys.delete_file(path)
    except (OSError, FabricError) as e:
        raise FabricError(f"run_dir {run_dir} is not writable: {_cause(e.__cause__ or e)}") from e
    _CHECKED.add(str(run_dir))
