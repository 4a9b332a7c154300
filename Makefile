# FedSegNet: `make demo` runs a whole federation on this machine; `make test` runs the test suite.
# Both start with `make setup`, which is idempotent (it reinstalls only when pyproject.toml changes).
# `make images`, `make images-offline` and `make deploy-smoke`: docker/Makefile.images.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsegnet-installed
# Pinned: on these machines torch==2.13.0 is the CPU wheel on local disk; an unpinned torch would
# pull a multi-GB CUDA build. Override on GPU hosts, e.g. `make setup TORCH_SPEC=torch==2.13.0+cu128`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast protos lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# buf lints the protos (tests/deploy/test_k8s.py); fzstd is the zstd of the Node.js conformance decoder
	# (tests/codec/test_conformance.py). Both come from npm, so only where npm is.
	if command -v npm >/dev/null; then npm install --silent --prefix .tools @bufbuild/buf@1.75.0 fzstd@0.1.1; fi
	# A real scan of a person no site derives from (docs/data.md): Debian's mricron-data, where apt works.
	if [ ! -f /usr/share/mricron/templates/ch2bet.nii.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get install -y -q mricron-data >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -q mricron-data >/dev/null; }; } \
		|| echo "mricron-data not installed: real-scan scores will be skipped"; fi
	touch $(STAMP)

demo: setup
	$(BIN)/fedseg simulate --config experiments/configs/demo-fedsegnet.toml --workdir runs/demo

test: setup
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (those that start processes, train, generate or render for long), each
# property test with a tenth of its hypothesis examples (tests/conftest.py), one pytest-xdist worker per core
# (each worker pays ~20 s of imports; the tests split between them): 45-49 s on 2 idle cores (64 s with cold file caches), 66 s in one process.
# `make test` runs every test with the full counts, in one process.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --hypothesis-profile=fast -n auto

# ruff (pyflakes and pycodestyle's error classes) on all the code, mypy on the packages; both clean.
LINT_PACKAGES := protos codec model aggregator_service client_agent experiments fedseg
lint: setup
	$(BIN)/ruff check $(LINT_PACKAGES) benchmarks tests
	$(BIN)/mypy $(LINT_PACKAGES)

protos: setup
	$(BIN)/python -m protos.generate

clean:
	rm -rf runs .pytest_cache

include docker/Makefile.images
