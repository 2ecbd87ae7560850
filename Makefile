# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both install into a virtual environment (.venv) from the checked-in lock, so a new machine gets
# exactly the versions the project was tested with.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt
STAMP := $(VENV)/.foundex-installed
# The venv's console scripts (foundex, feast) for the commands below and their subprocesses.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint lock

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of PyTorch first (this machine's local wheel): a looser requirement would pull
	# several GB of CUDA wheels. The lock pins the same torch==2.13.0.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(VENV)/bin/foundex demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

# Re-resolve the lock from pyproject.toml (runtime + dev extras) with uv, for Linux x86-64 and
# Python 3.11. torch resolves as the local CPU wheel (no nvidia-* packages) and is written as the
# plain pin torch==2.13.0, which that wheel satisfies.
lock: install
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	    --override requirements-torch-cpu.txt --custom-compile-command "make lock" --quiet -o $(LOCK).tmp
	sed 's/^torch==2\.13\.0+cpu$$/torch==2.13.0/' $(LOCK).tmp > $(LOCK)
	rm $(LOCK).tmp
	! grep -nE '^nvidia-|\+cu' $(LOCK)
