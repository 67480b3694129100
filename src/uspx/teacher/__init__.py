"""The bundled teacher: a small gpt_oss MoE trained on offline text.

Modules:

- :mod:`uspx.teacher.corpus` builds the corpus (python / shell / prose / arith).
- :mod:`uspx.teacher.tokenizer` trains the byte-level BPE tokenizer.
- :mod:`uspx.teacher.train` trains the ``GptOssForCausalLM`` teacher.
- :mod:`uspx.teacher.workloads` cuts the bundled user workloads from the test split.
- :mod:`uspx.teacher.report` measures the teacher and writes ``docs/teacher.md``.

The trained artefacts live in ``uspx/data/teacher`` (model) and
``uspx/data/workloads`` (JSONL workloads).
"""

from __future__ import annotations

from pathlib import Path

#: Folder of the committed teacher (config, safetensors, tokenizer).
TEACHER_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "teacher"
#: Folder of the committed workloads.
WORKLOADS_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "workloads"

FAMILIES: tuple[str, ...] = ("python", "shell", "prose", "arith")

__all__ = ["FAMILIES", "TEACHER_DIR", "WORKLOADS_DIR"]
