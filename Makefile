# edgefleet: `make demo` shows the product, `make test` proves it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := /usr/sbin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL := 3
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps lint typecheck imports test hostile bench demo clean arm-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $@

install: $(STAMP)

system-deps:
	scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

imports: install
	$(BIN)/lint-imports

test: system-deps install lint typecheck imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The hostile-input tests with 1,000 generated examples each (CI runs 200).
hostile: system-deps install
	EDGEFLEET_HOSTILE_EXAMPLES=1000 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_hostile_*.py

bench: system-deps install
	$(BIN)/python bench/agent_overhead.py
	$(BIN)/python bench/agent_update.py
	$(BIN)/python bench/converter.py
	$(BIN)/python bench/fleet_scale.py
	$(BIN)/python bench/fleet_deltas.py

demo: system-deps install
	$(BIN)/python -m edgefleet demo

# The agent on arm64 under qemu-user-static, in a cached Debian root filesystem (root;
# heavy, so not part of make test): docs/raspberry-pi.md.
arm-check: install
	$(BIN)/python scripts/arm_check.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
