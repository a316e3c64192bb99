# vlkd — the README's commands. Each target installs what it needs first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo demo-quick bench bench-quick clean

install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/vlkd-demo --out demo-out

demo-quick: install
	$(VENV)/bin/vlkd-demo --out demo-out --quick

bench: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

bench-quick: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf demo-out bench-out .pytest_cache
