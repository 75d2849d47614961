# The README's commands. Each target does its own set-up first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test test-unit test-container bench lint fuzz clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/ebpf-slo-exporter demo

test: setup
	$(BIN)/python -m pytest tests --ignore=tests/container $(PYTEST_ARGS)

# docker/Dockerfile built with podman and run with the manifests' privileges (a few minutes
# the first time: the base image is made with mmdebstrap and cached in /var/cache/ebpf-slo-exporter).
test-container: setup
	$(BIN)/python -m pytest tests/container $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

fuzz: setup
	EBPF_SLO_FUZZ=long $(BIN)/python -m pytest tests/unit/test_fuzz_http1.py tests/unit/test_fuzz_frames.py $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: setup
	$(BIN)/python -m ruff check exporter tests bench dashboards
	$(BIN)/python -m mypy exporter dashboards/build.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
