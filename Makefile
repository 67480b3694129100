# Two entry points, both safe on a fresh machine: they create .venv and install uspx first.
PY := .venv/bin/python
PIP_FLAGS := -q

.venv/installed: pyproject.toml
	python3 -m venv .venv
	# torch is pinned to 2.13.0 (CPU wheel); a looser range would pull the CUDA build.
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

.PHONY: setup demo lint test teacher
setup: .venv/installed

# The budget is what half the experts take at 4,096 tokens of context: extract cuts fewer and
# narrower experts under it, and measures the cut of whole experts beside it. The recovery is
# shortened to 100 steps (uspx recover's default is 300) to finish in a few minutes on 2 cores
# (a training step takes about 1.1 s with both cores, 1.6 s with one).
demo: setup
	.venv/bin/uspx extract default python_dev --budget 19.3MiB -o runs/quickstart --recover --recover-steps 100

# The package layers and the no-cycle rule (contracts in pyproject.toml), checked before the tests.
lint: setup
	.venv/bin/lint-imports

# llama.cpp for the tests that run it (its converter, llama-quantize, llama-imatrix, and the tests'
# reference run): release v0.5.0's source and Linux x86-64 libraries from the npm registry, with
# the programs compiled against them (tests/llama_cpp.sh; about 15 s, once, into .venv).
LLAMA_CPP := .venv/llama.cpp
$(LLAMA_CPP)/convert_hf_to_gguf.py: tests/llama_cpp.sh tests/llama_logits.c | setup
	tests/llama_cpp.sh $(LLAMA_CPP)

test: lint $(LLAMA_CPP)/convert_hf_to_gguf.py
	USPX_LLAMA_CPP=$(CURDIR)/$(LLAMA_CPP) $(PY) -m pytest -q

# Rebuild the bundled teacher from scratch (about an hour on 2 CPU cores). The shell
# family needs fixed Debian packages: `$(PY) -m teacher.corpus --print-deps` lists them.
teacher: setup
	$(PY) -m teacher.corpus --out data/corpus
	$(PY) -m teacher.tokenizer --corpus data/corpus --out data/tokenizer --vocab 4096
	$(PY) -m teacher.train --corpus data/corpus --tokenizer data/tokenizer --work runs/teacher --out src/uspx/data/teacher
	$(PY) -m teacher.workloads --corpus data/corpus --tokenizer data/tokenizer --out src/uspx/data/workloads
	$(PY) -m teacher.report --corpus data/corpus --teacher src/uspx/data/teacher --workloads src/uspx/data/workloads --out docs/teacher.md
