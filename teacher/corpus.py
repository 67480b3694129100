"""Build the teacher corpus from real text that exists offline on a Debian machine.

Families
--------
``python``
    Source ``.py`` files of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``; ``site-packages`` and the huge
    ``test`` packages are skipped).
``shell``
    Man pages (sections 1, 5, 7, 8) of a fixed list of Debian packages
    (:data:`SHELL_PACKAGES`) rendered to plain text with ``man -l`` (or
    ``groff -man -Tutf8``; a crude troff-stripping fallback when neither
    exists), plus those packages' shell scripts (a ``sh``/``bash``/``dash``
    shebang). Files come from ``dpkg-query -L``, never from a scan of the
    disk, so other installed software cannot leak in.
``prose``
    English documentation: ``pydoc_data.topics.topics`` and the module /
    class / function docstrings of the standard library (read with ``ast``,
    nothing is imported).
``arith``
    Generated exact arithmetic ("123 + 456 = 579"), see :func:`arith_document`.

Every document is deduplicated by the SHA-256 of its text and assigned to
``train`` / ``validation`` / ``test`` by that same hash (:func:`split_of`), so a
document lands in exactly one split and the split does not depend on the order
in which files are found. Each family is capped (``--mb-per-family``) so that
no family dominates and tokenizer training and teacher training stay fast.

A fresh Debian machine needs the packages and a renderer (``--print-deps``
prints the line)::

    apt-get install -y groff-base <SHELL_PACKAGES>

and a Python with its standard library source (every CPython install has it).
A missing package stops the build with an error that names it. The corpus is
a function of the Python install and the package versions (recorded in
``manifest.json`` with the SHA-256 of each split file) and of nothing else
on the machine.

Usage::

    python -m teacher.corpus --out data/corpus

writes ``data/corpus/{train,validation,test}.jsonl`` (one JSON object per line:
``{"family", "source", "text"}``), ``stats.json`` and ``manifest.json``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from uspx.io import write_text

SPLITS: tuple[str, ...] = ("train", "validation", "test")
FAMILIES: tuple[str, ...] = ("python", "shell", "prose", "arith")

#: Share of documents (by hash) in validation and test; the rest is train.
VALID_FRACTION = 0.05
TEST_FRACTION = 0.10

MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 200_000


@dataclass(frozen=True)
class Doc:
    """One corpus document."""

    family: str
    source: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"family": self.family, "source": self.source, "text": self.text}, ensure_ascii=False)


# --------------------------------------------------------------------------- splits


def split_of(text: str, valid_fraction: float = VALID_FRACTION, test_fraction: float = TEST_FRACTION) -> str:
    """Split of a document, a pure function of its content hash.

    Hashing the content (not the path or the position) makes the split
    deterministic across machines and file orders, and identical texts (which
    are deduplicated anyway) can never straddle two splits.
    """
    h = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)
    if h < test_fraction:
        return "test"
    if h < test_fraction + valid_fraction:
        return "validation"
    return "train"


def dedup(docs: Iterable[Doc]) -> list[Doc]:
    """Drop documents whose exact text was already seen (first occurrence wins)."""
    seen: set[str] = set()
    out: list[Doc] = []
    for d in docs:
        k = d.digest
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


def split_docs(docs: Sequence[Doc]) -> dict[str, list[Doc]]:
    """Deduplicate and assign every document to exactly one split."""
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in dedup(docs):
        out[split_of(d.text)].append(d)
    return out


# --------------------------------------------------------------------------- helpers


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw[:4096]:
        return None  # binary
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _clean(text: str) -> str:
    # Tabs and CRLF are kept as is for code; only strip trailing blank space so
    # that identical files with different trailing newlines deduplicate.
    return text.replace("\r\n", "\n").strip("\n") + "\n"


def _cap(docs: list[Doc], max_bytes: int) -> list[Doc]:
    """Keep a deterministic, content-ordered subset of at most ``max_bytes``.

    Ordering by hash rather than by path gives a varied sample (not just the
    alphabetically first modules) that is the same on every machine that has
    the same files.
    """
    docs = sorted(dedup(docs), key=lambda d: d.digest)
    out: list[Doc] = []
    total = 0
    for d in docs:
        n = len(d.text.encode("utf-8"))
        if total + n > max_bytes:
            continue
        out.append(d)
        total += n
    return out


# --------------------------------------------------------------------------- python


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> Iterator[Path]:
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                yield Path(dirpath) / fn


def python_docs() -> list[Doc]:
    """Standard library source files."""
    root = stdlib_dir()
    out: list[Doc] = []
    for p in _stdlib_files():
        t = _read_text(p)
        if t is None or not (MIN_DOC_CHARS <= len(t) <= MAX_DOC_CHARS):
            continue
        out.append(Doc("python", f"stdlib:{p.relative_to(root)}", _clean(t)))
    return out


def docstring_docs() -> list[Doc]:
    """Docstrings of stdlib modules, classes and functions, one document per module."""
    root = stdlib_dir()
    out: list[Doc] = []
    for p in _stdlib_files():
        t = _read_text(p)
        if t is None:
            continue
        try:
            tree = ast.parse(t)
        except (SyntaxError, ValueError):
            continue
        parts: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                ds = ast.get_docstring(node)
                # Short docstrings ("Return x.") are mostly noise; keep paragraphs.
                if ds and len(ds) >= 60:
                    parts.append(ds.strip())
        text = "\n\n".join(parts)
        if len(text) >= MIN_DOC_CHARS:
            out.append(Doc("prose", f"docstrings:{p.relative_to(root)}", _clean(text[:MAX_DOC_CHARS])))
    return out


def pydoc_topic_docs() -> list[Doc]:
    """The pydoc topics (the language reference text shipped with CPython)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [Doc("prose", f"pydoc:{k}", _clean(v)) for k, v in sorted(topics.items()) if len(v) >= MIN_DOC_CHARS]


# --------------------------------------------------------------------------- shell


_TROFF_REQ = re.compile(r"^\.[A-Za-z]{1,3}\b ?")
_TROFF_ESC = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&|^%]|\\s[+-]?\d")


def _strip_troff(src: str) -> str:
    """Crude troff to text: drop comments and requests, keep their arguments."""
    lines = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        line = _TROFF_REQ.sub("", line) if line.startswith(".") else line
        line = _TROFF_ESC.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        lines.append(line.replace('"', "") if line.startswith(("SH", "TH")) else line)
    return "\n".join(lines)


def render_man(path: Path) -> str | None:
    """Render one man page to plain text (man -l, else groff, else a troff stripper)."""
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    cmds: list[list[str]] = []
    if shutil.which("man"):
        cmds.append(["man", "-l", str(path)])
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, capture_output=True, env=env, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout:
            txt = r.stdout.decode("utf-8", "replace")
            # Strip any overstrike formatting that slipped through ("a\ba").
            return re.sub(r".\x08", "", txt)
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        src = raw.decode("utf-8", "replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if src.startswith(".so "):
        return None  # a link to another page: its target is rendered on its own
    if shutil.which("groff"):
        try:
            r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=raw, capture_output=True,
                               env=env, timeout=20, check=False)
            if r.returncode == 0 and r.stdout:
                return r.stdout.decode("utf-8", "replace")
        except (OSError, subprocess.TimeoutExpired):
            pass
    return _strip_troff(src)


#: Debian packages whose man pages and shell scripts make the shell family.
#: A fixed list, not "whatever is installed": installing an unrelated package
#: (a browser, a cloud SDK with 20 MB of man pages) must not change the corpus.
#: All are in Debian main; ``apt-get install`` of this list plus man-db and
#: groff-base gives the same files on every machine of the same release.
SHELL_PACKAGES: tuple[str, ...] = (
    "apt", "bash", "bsdutils", "bzip2", "coreutils", "curl", "debianutils", "diffutils", "dpkg",
    "e2fsprogs", "file", "findutils", "gettext-base", "git", "git-man", "gnupg", "gpg", "grep", "gzip",
    "hostname", "init-system-helpers", "iproute2", "less", "libc-bin", "login", "make", "man-db",
    "manpages", "mount", "ncurses-bin", "openssh-client", "passwd", "patch", "procps", "sed",
    "sensible-utils", "tar", "tmux", "ucf", "util-linux", "wget", "xz-utils", "zstd",
)
#: Not read, but they render the man pages: their versions are recorded too.
RENDER_PACKAGES: tuple[str, ...] = ("groff-base",)
#: Commands, file formats, overviews and administration; sections 2 and 3
#: (the C library API) are not what a shell user reads.
_MAN_PAGE = re.compile(r"^/usr/share/man/man[1578]/[^/]+$")
#: Package files under /etc are conffiles a machine may have edited: skipped.
_SCRIPT_ROOTS: tuple[str, ...] = ("/usr/", "/bin/", "/sbin/", "/lib/")


def package_files(packages: Sequence[str] = SHELL_PACKAGES) -> dict[str, list[Path]]:
    """Files each Debian package installed (``dpkg-query -L``), sorted.

    Raises ``SystemExit`` naming every package that is not installed.
    """
    if not shutil.which("dpkg-query"):
        raise SystemExit("error: dpkg-query not found: the shell family is built from Debian packages")
    out: dict[str, list[Path]] = {}
    missing: list[str] = []
    for pkg in packages:
        r = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            missing.append(pkg)
            continue
        out[pkg] = sorted(Path(line) for line in r.stdout.splitlines() if line.startswith("/"))
    if missing:
        raise SystemExit(f"error: Debian packages not installed: {' '.join(missing)}; run "
                         f"`apt-get install -y {' '.join(missing)}`")
    return out


def package_versions(packages: Sequence[str] = SHELL_PACKAGES + RENDER_PACKAGES) -> dict[str, str]:
    """Installed version of each package, recorded so two corpora can be compared."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages],
                       capture_output=True, text=True, check=False)
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def _man_files(files: dict[str, list[Path]]) -> list[Path]:
    out: set[Path] = set()
    for paths in files.values():
        for p in paths:
            # Symlinked pages duplicate their target.
            if _MAN_PAGE.match(str(p)) and p.is_file() and not p.is_symlink() and p.stat().st_size > 300:
                out.add(p)
    return sorted(out)


def man_docs(files: dict[str, list[Path]], max_bytes: int, workers: int = 2) -> list[Doc]:
    """Render the packages' man pages, in hash order of their name, until ``max_bytes`` of text."""
    pages = sorted(_man_files(files), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    out: list[Doc] = []
    total = 0
    batch = 64
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i in range(0, len(pages), batch):
            chunk = pages[i:i + batch]
            for p, txt in zip(chunk, ex.map(render_man, chunk)):
                if not txt or len(txt) < MIN_DOC_CHARS:
                    continue
                txt = _clean(txt[:MAX_DOC_CHARS])
                out.append(Doc("shell", f"man:{p.parent.name}/{p.name}", txt))
                total += len(txt.encode("utf-8"))
            if total >= max_bytes * 1.2:  # render a bit more than needed; _cap trims
                break
    return out


_SHEBANG = re.compile(rb"^#!\s*\S*/(?:env\s+)?(?:ba|da|k|z)?sh\b")


def shell_script_docs(files: dict[str, list[Path]], roots: Sequence[str] = _SCRIPT_ROOTS) -> list[Doc]:
    """The packages' shell scripts under ``roots``: files whose first line is a sh/bash shebang."""
    out: list[Doc] = []
    seen: set[Path] = set()
    for pkg in sorted(files):
        for p in files[pkg]:
            if not str(p).startswith(tuple(roots)) or p in seen or p.is_symlink() or not p.is_file():
                continue
            seen.add(p)
            size = p.stat().st_size
            if size < MIN_DOC_CHARS or size > MAX_DOC_CHARS:
                continue
            try:
                with open(p, "rb") as f:
                    head = f.read(64)
            except OSError:
                continue
            if not _SHEBANG.match(head):
                continue
            t = _read_text(p)
            if t is not None:
                out.append(Doc("shell", f"script:{pkg}:{p}", _clean(t)))
    return out


# --------------------------------------------------------------------------- arith


def arith_line(rng: random.Random) -> str:
    """One exact arithmetic fact: ``a + b = c``, ``a - b = c`` or ``a * b = c``."""
    op = rng.choice("+-*")
    digits_a = rng.randint(1, 4 if op == "*" else 6)
    digits_b = rng.randint(1, 4 if op == "*" else 6)
    a = rng.randint(0, 10**digits_a - 1)
    b = rng.randint(0, 10**digits_b - 1)
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}"


def parse_arith_line(line: str) -> tuple[int, str, int, int]:
    """Inverse of :func:`arith_line`: ``(a, op, b, c)``."""
    m = re.fullmatch(r"(-?\d+) ([+*-]) (-?\d+) = (-?\d+)", line.strip())
    if not m:
        raise ValueError(f"not an arithmetic line: {line!r}")
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def arith_document(seed: int, n_lines: int = 48) -> str:
    """A document of ``n_lines`` arithmetic facts, reproducible from ``seed``."""
    rng = random.Random(seed)
    return "\n".join(arith_line(rng) for _ in range(n_lines)) + "\n"


def arith_docs(max_bytes: int, seed: int = 0) -> list[Doc]:
    out: list[Doc] = []
    total = 0
    i = 0
    while total < max_bytes:
        t = arith_document(seed * 1_000_003 + i)
        out.append(Doc("arith", f"arith:{seed}:{i}", t))
        total += len(t)
        i += 1
    return out


# --------------------------------------------------------------------------- build


_MISSING_HINT = {
    "python": "the Python standard library sources were not found (a CPython install with its .py files is needed)",
    "shell": "no man pages / shell scripts found: run `apt-get install -y man-db groff-base` plus "
             "SHELL_PACKAGES (and make sure /etc/dpkg/dpkg.cfg.d/excludes does not drop /usr/share/man)",
    "prose": "no pydoc topics / docstrings found: the Python install lacks pydoc_data or its stdlib sources",
    "arith": "the arithmetic generator produced nothing (bug)",
}


def build(mb_per_family: float = 4.0, seed: int = 0, workers: int = 2, log: bool = True) -> dict[str, list[Doc]]:
    """Collect all families, cap each, dedup, split. Raises if a family is empty."""
    cap = int(mb_per_family * 1e6)

    def say(msg: str) -> None:
        if log:
            print(msg, file=sys.stderr, flush=True)

    say("python: stdlib sources ...")
    py = _cap(python_docs(), cap)
    say("prose: pydoc topics + docstrings ...")
    topics = pydoc_topic_docs()
    # Pydoc topics are the most "written prose" text we have: keep them all,
    # fill the rest of the budget with docstrings.
    prose = _cap(topics, cap)
    prose += _cap(docstring_docs(), cap - sum(len(d.text.encode()) for d in prose))
    say(f"shell: scripts of {len(SHELL_PACKAGES)} Debian packages ...")
    files = package_files()
    # Scripts take up to a third of the shell budget (the "code" a shell user
    # writes), man pages the rest (what they read).
    scripts = _cap(shell_script_docs(files), cap // 3)
    say("shell: man pages ...")
    man_cap = cap - sum(len(d.text.encode()) for d in scripts)
    shell = _cap(man_docs(files, man_cap, workers=workers), man_cap) + scripts
    arith = _cap(arith_docs(int(cap * 0.5), seed=seed), cap)  # arith is repetitive: half a budget is plenty

    fams = {"python": py, "shell": shell, "prose": prose, "arith": arith}
    for f, docs in fams.items():
        if not docs:
            raise SystemExit(f"error: family {f!r} is empty: {_MISSING_HINT[f]}")
    all_docs = [d for f in FAMILIES for d in fams[f]]
    splits = split_docs(all_docs)
    for f in FAMILIES:
        for s in SPLITS:
            if not any(d.family == f for d in splits[s]):
                raise SystemExit(f"error: family {f!r} has no document in split {s!r}; raise --mb-per-family")
    return splits


def _atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def stats(splits: dict[str, list[Doc]]) -> dict[str, dict[str, dict[str, int]]]:
    """Documents and bytes per split and family."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for s, docs in splits.items():
        out[s] = {}
        for f in FAMILIES:
            fd = [d for d in docs if d.family == f]
            out[s][f] = {"docs": len(fd), "bytes": sum(len(d.text.encode("utf-8")) for d in fd)}
    return out


def write(splits: dict[str, list[Doc]], out_dir: Path) -> dict[str, dict[str, dict[str, int]]]:
    """Write ``{split}.jsonl`` and ``stats.json`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, docs in splits.items():
        _atomic_write_lines(out_dir / f"{s}.jsonl", (d.to_json() for d in docs))
    st = stats(splits)
    tmp = out_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(st, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "stats.json")
    write_text(out_dir / "manifest.json", json.dumps(manifest(out_dir), indent=2) + "\n")
    return st


def manifest(out_dir: Path) -> dict[str, object]:
    """What the corpus was built from, and the SHA-256 of each split file.

    Two builds are the same corpus exactly when their ``sha256`` entries match;
    when they do not, ``python`` and ``packages`` say which source moved.
    """
    return {
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "sha256": {f"{s}.jsonl": hashlib.sha256((out_dir / f"{s}.jsonl").read_bytes()).hexdigest() for s in SPLITS},
    }


def read_split(corpus_dir: Path, split: str) -> list[dict[str, str]]:
    """Read one split's JSONL."""
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m teacher.corpus --out {corpus_dir}` first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def print_stats(st: dict[str, dict[str, dict[str, int]]]) -> None:
    total = sum(v["bytes"] for s in st.values() for v in s.values())
    print(f"{'split':<11}{'family':<8}{'docs':>8}{'MB':>9}{'share':>8}")
    for s, fams in st.items():
        sb = sum(v["bytes"] for v in fams.values())
        for f, v in fams.items():
            share = v["bytes"] / sb if sb else 0.0
            print(f"{s:<11}{f:<8}{v['docs']:>8}{v['bytes'] / 1e6:>9.2f}{share:>8.1%}")
    print(f"total {total / 1e6:.2f} MB")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--mb-per-family", type=float, default=4.0, help="cap per family, in MB of UTF-8 text")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arithmetic generator")
    ap.add_argument("--workers", type=int, default=2, help="parallel man renderers")
    ap.add_argument("--print-deps", action="store_true", help="print the apt-get command that installs the sources")
    a = ap.parse_args(argv)
    if a.print_deps:
        print("apt-get install -y " + " ".join(sorted(set(SHELL_PACKAGES + RENDER_PACKAGES))))
        return 0
    splits = build(a.mb_per_family, a.seed, a.workers)
    st = write(splits, a.out)
    print_stats(st)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
