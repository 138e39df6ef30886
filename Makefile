# make quickstart  - create .venv, install, pull SmolLM2-135M-Instruct, fine-tune it on the Lumo 3
#                    support data (~5 min on 2 CPU cores), then compare answers before and after
# make test        - install and run the test suite
# make test-acceptance - the long real-model checks of issues' promises (~15 min; docs/benchmarks.md)
# make image       - the container image localhost/slmtune:cpu (deploy/Containerfile) with podman, else
#                    docker; VARIANT=cuda for localhost/slmtune:cuda (docs/kubernetes.md, "Images")
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast test-acceptance image clean

$(BIN)/slmtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch; see README for CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	# llama-cpp-python (the test extra) compiles llama.cpp here: without its multimodal library
	# (llava/mtmd, unused by slmtune) the build is shorter.
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" $(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/slmtune

install: $(BIN)/slmtune

quickstart: install
	$(BIN)/slmtune models pull smollm2-135m-instruct
	$(BIN)/slmtune train recipes/quickstart/support_assistant.yaml
	$(BIN)/python examples/support_assistant/compare.py runs/quickstart

test: install
	$(BIN)/python -m pytest -q -ra --durations=25

test-acceptance: install
	SLMTUNE_ACCEPTANCE=1 $(BIN)/python -m pytest -q -ra -m acceptance

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# deploy/setup-podman.sh installs and configures podman on Debian; build-image.sh makes the offline
# Debian base image with debootstrap when it is missing and passes the host's pip configuration.
image:
	deploy/build-image.sh

clean:
	rm -rf runs .pytest_cache
