# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test lint

install:
	# The CPU build of PyTorch first: a looser requirement would pull several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	foundex demo

test: install
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
