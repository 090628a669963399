# The two entry points of the README: `make demo` and `make test`.
# Both set up everything they need on a fresh machine: a virtual environment in .venv with the
# CPU build of torch (pinned in constraints/ci.txt) and, when run as root, the Debian
# Prometheus packages the end-to-end tests use.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.lrwatch-installed
PROM_BINS = prometheus promtool prometheus-pushgateway prometheus-alertmanager
PROM_PKGS = prometheus prometheus-alertmanager prometheus-pushgateway
DEMO_ARGS ?=
# Two workers (pytest-xdist), a test file per worker at a time (module fixtures start once).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test setup system-deps bench clean

demo: setup
	$(VENV)/bin/lrwatch demo $(DEMO_ARGS)

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

# Quiet pip, but never silent: a fresh set-up takes a minute or more, so say what is going on.
$(STAMP): pyproject.toml setup.py lrwatch/daemon/_jsonl.c constraints/ci.txt
	@echo "lrwatch set-up (once; about a minute on a fresh machine):"
	@echo "  [1/3] creating the virtual environment $(VENV)/"
	@$(PYTHON) -m venv $(VENV)
	@echo "  [2/3] upgrading pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "  [3/3] installing lrwatch (editable) with torch (CPU build, pinned in constraints/ci.txt),"
	@echo "        Lightning, transformers, matplotlib and the test tools; compiling the JSONL decoder"
	@$(PY) -m pip install -q -c constraints/ci.txt -e '.[torch,dev]'
	@touch $(STAMP)
	@echo "done: $(VENV)/bin/lrwatch is installed (\`source $(VENV)/bin/activate\` puts it on PATH)"

# Installs the Prometheus stack when it is missing and we are root; otherwise says what to install
# (the tests that need these binaries then skip and name them).
system-deps:
	@missing=""; for b in $(PROM_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(PROM_PKGS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PROM_PKGS) >/dev/null; \
	  else \
	    echo "missing:$$missing -- install with: sudo apt-get install $(PROM_PKGS)"; \
	    echo "(the tests that need them will be skipped)"; \
	  fi; \
	fi

bench: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
