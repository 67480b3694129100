"""The user's workload: what they ask the model, normalised into prompt / completion items.

Input is JSONL (one object a line with ``prompt``, chat ``messages`` or ``text``; optional
``completion``, ``family``, ``id``, ``split``, and the success checks ``answer``, ``regex``, ``json``,
``tests`` with ``max_new_tokens`` and ``stop``) or a folder of text files (family = sub-folder name).
Every item lands in the calibration or the held-out part by a hash of its content, so appending lines
never moves an existing item from one part to the other.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from uspx.io import UspxError, sha256_json

BUNDLED_WORKLOADS = Path(__file__).resolve().parent / "data" / "workloads"
SPLITS = ("calibration", "heldout")
TEXT_SUFFIXES = {".txt", ".md", ".py", ".sh", ".rst", ".text", ""}


MAX_NEW_TOKENS_LIMIT = 8192
CHECK_KEYS = ("answer", "regex", "json", "tests", "max_new_tokens", "stop")


@dataclass(frozen=True)
class Checks:
    """How to judge a generated continuation of an item (:mod:`uspx.evaluate.checks` applies them).

    ``answer``: the first non-empty line must equal it after normalisation, or as a number;
    ``regex``: the text must match it in full; ``json``: the text must parse as JSON (True), or also
    validate against this JSON Schema (a dict); ``tests``: Python test code run in the sandbox after
    the prompt and the generation. ``stop`` cuts the generation at the first of these strings;
    ``max_new_tokens`` bounds it (None: the evaluation's default)."""

    answer: str | None = None
    regex: str | None = None
    json: bool | dict = False
    tests: str | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def kinds(self) -> list[str]:
        """The checks this item carries, in a fixed order."""
        return [k for k, v in (("answer", self.answer), ("regex", self.regex), ("json", self.json),
                               ("tests", self.tests)) if v not in (None, False)]


@dataclass
class WorkloadItem:
    id: str
    family: str
    split: str
    prompt: str
    completion: str | None = None
    messages: list[dict] | None = None  # kept so the chat template can render it
    checks: Checks | None = None  # a success test for a generated continuation


@dataclass
class WorkloadSummary:
    lines: int = 0
    items: int = 0
    skipped_empty: int = 0
    duplicates: int = 0  # items identical to an earlier one, skipped
    truncated: int = 0  # filled in by encode()
    truncated_tokens: int = 0
    families: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=dict)  # items carrying each kind of check

    def lines_of_text(self) -> list[str]:
        out = [
            f"{self.items} items from {self.lines} lines; {self.skipped_empty} empty and "
            f"{self.duplicates} duplicate items skipped; "
            f"{self.truncated} truncated to the context ({self.truncated_tokens} tokens cut)",
            "families: " + ", ".join(f"{k}={v}" for k, v in sorted(self.families.items())),
            "splits: " + ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items())),
        ]
        if self.checks:
            out.append("checks: " + ", ".join(f"{k}={v}" for k, v in sorted(self.checks.items())))
        return out


@dataclass
class Workload:
    source: str
    items: list[WorkloadItem]
    summary: WorkloadSummary
    heldout_fraction: float = 0.2

    @property
    def fingerprint(self) -> str:
        # an item without checks hashes as before checks existed: earlier runs keep their fingerprints
        return sha256_json([{k: v for k, v in asdict(i).items() if k != "checks" or v is not None}
                            for i in self.items])

    def part(self, split: str) -> "Workload":
        if split not in SPLITS and split != "all":
            raise UspxError(f"unknown split {split!r}; use one of {SPLITS + ('all',)}")
        items = self.items if split == "all" else [i for i in self.items if i.split == split]
        return Workload(self.source, items, self.summary, self.heldout_fraction)

    @property
    def families(self) -> list[str]:
        return sorted({i.family for i in self.items})


def resolve_workload_path(name: str | Path) -> Path:
    """A path, or the name of a bundled workload (``python_dev``, ``shell_user``, ``docs_writer``...)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = BUNDLED_WORKLOADS / f"{name}.jsonl"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in BUNDLED_WORKLOADS.glob("*.jsonl"))
    raise UspxError(f"{name}: no such file or folder, and not a bundled workload ({', '.join(names) or 'none'})")


def split_of(key: str, heldout_fraction: float) -> str:
    """Deterministic split from a content hash: stable when other items are added."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "calibration"


def load_workload(
    name: str | Path | Workload, heldout_fraction: float = 0.2, default_family: str = "default"
) -> Workload:
    """The workload file or folder ``name`` (or a bundled name) read and checked; a Workload given is
    returned as it is."""
    if isinstance(name, Workload):
        return name
    path = resolve_workload_path(name)
    summary = WorkloadSummary()
    raw = list((_read_folder if path.is_dir() else _read_jsonl)(path, summary))
    items: list[WorkloadItem] = []
    seen: set[str] = set()
    for where, obj in raw:
        item = _normalise(obj, where, heldout_fraction, default_family)
        if item is None:
            summary.skipped_empty += 1
            continue
        if item.id in seen:
            if "id" in obj:
                raise UspxError(f"{where}: duplicate id {item.id!r}")
            summary.duplicates += 1
            continue
        seen.add(item.id)
        items.append(item)
    if not items:
        raise UspxError(f"{path}: no usable items ({summary.skipped_empty} empty)")
    summary.items = len(items)
    summary.families = dict(Counter(it.family for it in items))
    summary.splits = dict(Counter(it.split for it in items))
    summary.checks = dict(Counter(kind for it in items if it.checks for kind in it.checks.kinds))
    return Workload(str(path), items, summary, heldout_fraction)


def _not_utf8(path: Path, data: bytes, offset: int, first_line: int = 1) -> UspxError:
    """The error for ``data`` (read from ``path`` from line ``first_line`` on) whose byte at ``offset``
    is not UTF-8: it names the file, the line and the column (1-based, in bytes)."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    lineno = first_line + data.count(b"\n", 0, offset)
    return UspxError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[offset]:02x} at column "
                     f"{offset - line_start + 1}); save the file as UTF-8")


def _read_jsonl(path: Path, summary: WorkloadSummary) -> Iterable[tuple[str, dict]]:
    # Bytes, decoded line by line, so an invalid byte is reported at its own line.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            summary.lines += 1
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, raw, exc.start, lineno) from None
            if not line.strip():
                summary.skipped_empty += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UspxError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UspxError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _read_folder(path: Path, summary: WorkloadSummary) -> Iterable[tuple[str, dict]]:
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name.startswith(".") or f.suffix not in TEXT_SUFFIXES:
            continue
        summary.lines += 1
        rel = f.relative_to(path)
        family = rel.parts[0] if len(rel.parts) > 1 else "default"
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(f, data, exc.start) from None
        yield str(f), {"text": text, "family": family, "id": str(rel)}


def _normalise(obj: dict, where: str, heldout_fraction: float, default_family: str) -> WorkloadItem | None:
    keys = [k for k in ("prompt", "messages", "text") if k in obj]
    if len(keys) != 1:
        raise UspxError(f"{where}: needs exactly one of 'prompt', 'messages' or 'text' (found {keys or 'none'})")
    messages = None
    if keys[0] == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UspxError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if not messages:
            return None
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)  # fallback rendering
    else:
        prompt = obj[keys[0]]
        if not isinstance(prompt, str):
            raise UspxError(f"{where}: '{keys[0]}' must be a string")
    completion = obj.get("completion")
    if completion is not None and not isinstance(completion, str):
        raise UspxError(f"{where}: 'completion' must be a string")
    if not prompt.strip() and not (completion or "").strip():
        return None
    family = obj.get("family", default_family)
    if not isinstance(family, str) or not family:
        raise UspxError(f"{where}: 'family' must be a non-empty string")
    key = json.dumps([prompt, completion, messages], sort_keys=True)
    item_id = obj.get("id")
    item_id = hashlib.sha256(key.encode()).hexdigest()[:16] if item_id is None else item_id
    split = obj.get("split")
    if split is None:
        split = split_of(key, heldout_fraction)
    elif split not in SPLITS:
        raise UspxError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    return WorkloadItem(str(item_id), family, split, prompt, completion or None, messages, _checks(obj, where))


def _checks(obj: dict, where: str) -> Checks | None:
    """The item's success checks, each validated here so that a bad one is named by file and line."""
    if not any(k in obj for k in CHECK_KEYS):
        return None
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UspxError(f"{where}: 'answer' must be a string or a number")
        answer = answer if isinstance(answer, str) else json.dumps(answer)
        if not answer.strip():
            raise UspxError(f"{where}: 'answer' is empty")
    regex = obj.get("regex")
    if regex is not None:
        if not isinstance(regex, str):
            raise UspxError(f"{where}: 'regex' must be a string (a Python regular expression)")
        try:
            re.compile(regex)
        except re.error as exc:
            raise UspxError(f"{where}: 'regex' does not compile: {exc}") from None
    schema = obj.get("json", False)
    if not isinstance(schema, (bool, dict)):
        raise UspxError(f"{where}: 'json' must be true (the text must parse) or a JSON Schema object")
    if isinstance(schema, dict):
        _check_schema(schema, where)
    tests = obj.get("tests")
    if tests is not None:
        if not isinstance(tests, str) or not tests.strip():
            raise UspxError(f"{where}: 'tests' must be non-empty Python code (a string)")
        try:
            compile(tests, f"{where}:tests", "exec")  # compiled, never run, here
        except SyntaxError as exc:
            raise UspxError(f"{where}: 'tests' is not valid Python ({exc.msg}, line {exc.lineno})") from None
    limit = obj.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or not 1 <= limit <= MAX_NEW_TOKENS_LIMIT):
        raise UspxError(f"{where}: 'max_new_tokens' must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}")
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise UspxError(f"{where}: 'stop' must be a non-empty string or a list of them")
    checks = Checks(answer, regex, schema, tests, limit, tuple(stop))
    if not checks.kinds:
        raise UspxError(f"{where}: 'max_new_tokens' or 'stop' without a check to apply "
                        "(add 'answer', 'regex', 'json' or 'tests')")
    return checks


def _check_schema(schema: dict, where: str) -> None:
    """A JSON Schema needs the maintained validator (an optional extra); the schema itself is
    checked against its meta-schema now."""
    try:
        import jsonschema
    except ImportError:
        raise UspxError(f"{where}: a 'json' schema needs the jsonschema package: pip install 'uspx[checks]' "
                        "(or use \"json\": true to check only that the text parses)") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UspxError(f"{where}: 'json' is not a valid JSON Schema: {exc.message}") from None


# ----- tokenisation ------------------------------------------------------------------------------
@dataclass
class EncodedItem:
    index: int  # position in the workload
    id: str
    family: str
    split: str
    input_ids: list[int]
    completion_start: int  # first token whose prediction is scored: the completion, or 0 without one


DEFAULT_MAX_LENGTH = 512  # tokens per item, for every stage (trace, score, eval, extract, recover, workload)


def default_max_length(config=None) -> int:
    """The truncation length every stage uses unless told otherwise: 512 tokens, or the model's
    context when shorter."""
    context = getattr(config, "max_position_embeddings", None) if config is not None else None
    return min(DEFAULT_MAX_LENGTH, int(context)) if context else DEFAULT_MAX_LENGTH


def encode(workload: Workload, tokenizer, max_length: int) -> list[EncodedItem]:
    """Tokenise every item to at most ``max_length`` tokens, counting what was truncated.

    Truncation cuts the prompt's start first (the completion is what quality is measured on), then
    the completion's end.
    """
    out = []
    summary = workload.summary
    summary.truncated = summary.truncated_tokens = 0
    for i, item in enumerate(workload.items):
        prompt_ids = _render_prompt(item, tokenizer)
        comp_ids = tokenizer.encode(item.completion, add_special_tokens=False) if item.completion else []
        total = len(prompt_ids) + len(comp_ids)
        if total > max_length:
            summary.truncated += 1
            summary.truncated_tokens += total - max_length
            keep_prompt = max(1, max_length - len(comp_ids)) if prompt_ids else 0
            prompt_ids = prompt_ids[len(prompt_ids) - min(keep_prompt, len(prompt_ids)):]
            comp_ids = comp_ids[: max_length - len(prompt_ids)]
        ids = list(prompt_ids) + list(comp_ids)
        start = len(prompt_ids) if item.completion else 0
        out.append(EncodedItem(i, item.id, item.family, item.split, ids, start))
    return out


def generation_prompt(item: WorkloadItem, tokenizer, max_length: int) -> list[int]:
    """The token ids a model continues to answer ``item`` (a chat item ends with the assistant's
    turn opened), cut from the start to ``max_length`` tokens as :func:`encode` cuts prompts."""
    ids = _render_prompt(item, tokenizer, generation=True)
    return ids[max(0, len(ids) - max_length):]


def _render_prompt(item: WorkloadItem, tokenizer, generation: bool = False) -> list[int]:
    if item.messages is not None and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            item.messages, tokenize=True, add_generation_prompt=generation or item.completion is not None
        )
        if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
            rendered = rendered["input_ids"]
        return list(rendered)
    return tokenizer.encode(item.prompt, add_special_tokens=False) if item.prompt else []
