"""Build code of the bundled teacher, a small gpt_oss MoE trained on offline text.

Not part of the installed package: ``make teacher`` runs it from the repository root.

- :mod:`teacher.corpus` builds the corpus (python / shell / prose / arith).
- :mod:`teacher.tokenizer` trains the byte-level BPE tokenizer.
- :mod:`teacher.train` trains the ``GptOssForCausalLM`` teacher.
- :mod:`teacher.workloads` cuts the bundled user workloads from the test split.
- :mod:`teacher.report` measures the teacher and writes ``docs/teacher.md``.

The trained artefacts live in ``src/uspx/data/teacher`` (model) and ``src/uspx/data/workloads``
(JSONL workloads).
"""
