# Every target works from nothing: it creates the venv and installs the project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from its pin, so nothing else can pull a different build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/amgen demo

bench: $(STAMP)
	$(BIN)/python bench/exemplar_reuse.py
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/pipeline_efficiency.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/toytown_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
