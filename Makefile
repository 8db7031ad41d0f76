# Setup lives here: `make build` and `make test` both create .venv at the repo root on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TARGET ?= android
MODEL  ?= smollm2-135m
PYTEST_ARGS ?=

.PHONY: setup build test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, exactly pinned: this machine carries the CPU wheel of 2.13.0; anything looser pulls CUDA.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	# llamacpp: pip compiles llama.cpp here (4 to 10 minutes on 2 cores), so that desktop-gguf, the GGUF
	# quantizers and the llama.cpp peers are tested, not skipped.
	$(BIN)/python -m pip install --quiet -e ".[all,dev,llamacpp]"
	touch $(STAMP)

# onnxruntime-web (WASM) and transformers.js (on onnxruntime-node) for the tests that run the web artifact the way a
# browser and a transformers.js app would; skipped without npm. ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's
# install script would fetch its CUDA provider from NuGet; its CPU binaries are in the npm package itself.
WEB_STAMP := .web/.installed-2
$(WEB_STAMP):
	@if command -v npm >/dev/null; then \
		ONNXRUNTIME_NODE_INSTALL=skip npm install --prefix .web --silent --no-audit --no-fund \
			onnxruntime-web@1.30.0 @huggingface/transformers@4.3.2 && touch $(WEB_STAMP); \
	else echo "npm not found: the onnxruntime-web and transformers.js tests will be skipped"; fi

setup: $(STAMP) $(WEB_STAMP)

build: setup
	$(BIN)/compress build --target $(TARGET) --model $(MODEL)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .web out .pytest_cache
