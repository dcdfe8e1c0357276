# nsfast: `make run` (demo) and `make test` do all set-up on a fresh machine: Debian
# packages (.ci/apt-deps), a venv with the Python tools, the release build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all sysdeps build run test test-rust test-python lint bench wheel wheel-aarch64 clean

all: build

# Debian packages (only installs what is missing; quick otherwise).
sysdeps:
	@bash .ci/apt-deps

$(PY): | sysdeps
	$(PYTHON) -m venv $(VENV)

# Python tools for building, testing and benchmarking, into the venv.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.5,<2" "pytest>=7" "pytest-timeout>=2" "psutil>=5.9" "rich>=13" mypy ruff benchexec==3.35 "ray>=2.9"
	touch $@

# Release build of the native module, installed into the venv (editable python/ tree).
build: sysdeps $(STAMP)
	$(VENV)/bin/maturin develop --release -q

run: build
	$(PY) -m nsfast demo

test: build lint test-rust test-python

# Formatting and lint are gates: part of `make test`, so of CI.
lint: $(STAMP)
	cargo fmt --all -- --check
	rustfmt --edition 2021 --check rust/init/main.rs
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy -q --all-targets --all-features -- -D warnings
	mkdir -p target && cd rust && clippy-driver --edition=2021 --crate-type=bin --crate-name=nsfast_init -C panic=abort \
		--emit=metadata -o $(CURDIR)/target/nsfast_init.rmeta -D warnings init/main.rs
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/python -m mypy --strict python/nsfast

test-rust:
	cargo test -q

test-python: build
	$(PY) -m mypy.stubtest nsfast._core
	$(PY) -m pytest

bench: build
	cargo build -q --release --example spawn_loop
	$(PY) benches/start_latency.py
	@# The peer throughput.py compares zygotes with (its rows are skipped, saying why, without it).
	$(PY) -m pip install -q "sandlock==0.9.0" || echo "sandlock could not be installed: its rows will be skipped"
	$(PY) benches/throughput.py
	@# Where concurrent starts wait (needs perf: linux-perf on Debian).
	if command -v perf >/dev/null; then $(PY) benches/offcpu.py; else echo "perf is not installed: benches/offcpu.py skipped"; fi

# A wheel pip installs on any x86_64 Linux with glibc >= 2.17 (manylinux2014), linked by zig
# (PyPI's ziglang: nothing outside the package registries), and an sdist, into $(DIST).
# nsfast-init is built without libc and libseccomp is linked statically (.cargo/config.toml),
# so the module needs nothing newer than the glibc symbols auditwheel lists.
DIST ?= dist
wheel: $(STAMP)
	$(PY) -m pip install -q ziglang "auditwheel>=6"
	rm -rf $(DIST)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build -q --release --zig --compatibility manylinux2014 -o $(DIST)
	$(VENV)/bin/maturin sdist -o $(DIST)
	$(VENV)/bin/auditwheel show $(DIST)/*.whl

# The same for aarch64, cross-built (not part of make test: nothing here runs aarch64). Needs
# `rustup target add aarch64-unknown-linux-gnu` and Debian's libseccomp-dev:arm64
# (dpkg --add-architecture arm64), whose libseccomp.a is linked in.
wheel-aarch64: $(STAMP)
	$(PY) -m pip install -q ziglang "auditwheel>=6"
	mkdir -p $(DIST)
	PATH="$(abspath $(VENV))/bin:$$PATH" LIBSECCOMP_LIB_PATH=/usr/lib/aarch64-linux-gnu $(VENV)/bin/maturin build -q \
		--release --zig --target aarch64-unknown-linux-gnu --compatibility manylinux2014 -o $(DIST)
	$(VENV)/bin/auditwheel show $(DIST)/*aarch64.whl

clean:
	rm -rf $(VENV) target .pytest_cache dist
