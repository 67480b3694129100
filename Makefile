# Two entry points, both safe on a fresh machine: they create .venv and install uspx first.
PY := .venv/bin/python
PIP_FLAGS := -q

.venv/installed: pyproject.toml
	python3 -m venv .venv
	# torch is pinned to 2.13.0 (CPU wheel); a looser range would pull the CUDA build.
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

.PHONY: setup demo test
setup: .venv/installed

demo: setup
	.venv/bin/uspx extract default python_dev --keep 50% -o runs/quickstart

test: setup
	$(PY) -m pytest -q
