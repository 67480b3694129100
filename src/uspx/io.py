"""Small file helpers shared by every stage: atomic writes, JSON, fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UspxError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class FingerprintMismatch(UspxError):
    """Two artifacts disagree on the model or workload they were made from."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A crash or kill mid-write leaves the old file (or nothing) and never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it into place only if the block succeeds.

    Readers never see a half-written model or trace: the folder appears whole or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` left in ``folder`` when a run was killed.

    Call it only when resuming a folder that no other process writes to.
    """
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink()
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise UspxError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UspxError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def record_path(out: str | os.PathLike) -> Path:
    """``OUT.uspx.json``: the record uspx writes beside a GGUF file it made (``OUT``)."""
    out = Path(out)
    return out.with_name(out.name + ".uspx.json")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def check_fingerprints(expected: dict[str, str], found: dict[str, str], what: str) -> None:
    """Raise unless every fingerprint in ``expected`` equals the one in ``found``.

    A trace from one model scored against another gives numbers that mean nothing, so this is an
    error, never a warning.
    """
    for key, value in expected.items():
        other = found.get(key)
        if other is not None and other != value:
            raise FingerprintMismatch(
                f"{what}: {key} fingerprint {other[:12]} does not match the expected {value[:12]}; "
                "the artifacts come from different models or workloads"
            )


class Provenance:
    """Mixin for artifacts whose record names the model and workload they came from.

    Subclasses set ``record`` (a dict with ``model`` and ``workload`` entries holding a
    ``fingerprint``) and ``path``.
    """

    record: dict
    path: Path | None

    @property
    def model_fingerprint(self) -> str:
        return self.record["model"]["fingerprint"]

    @property
    def workload_fingerprint(self) -> str:
        return self.record["workload"]["fingerprint"]

    def check(self, *, model: str | None = None, workload: str | None = None) -> None:
        """Raise FingerprintMismatch if this artifact comes from another model or workload."""
        expected, found = {}, {}
        if model is not None:
            expected["model"], found["model"] = model, self.model_fingerprint
        if workload is not None:
            expected["workload"], found["workload"] = workload, self.workload_fingerprint
        check_fingerprints(expected, found, str(self.path or type(self).__name__))
