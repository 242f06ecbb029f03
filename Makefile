# Two commands do all the set-up on a fresh Debian 12 (Python 3.11, gcc, root):
#   make demo   create .venv, install portshard, run the main demo
#   make test   install what the tests need (Debian packages too), then ruff, mypy, pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Debian packages the tests drive for real (real programs, real load).
# gcc + libc6-dev (static libc.a), golang-go, nodejs, ruby: the unmodified servers of the
# interposition tests (tests/integration/test_interpose*.py).
DEB_TEST_PKGS := netcat-openbsd wrk iproute2 procps chromium gcc libc6-dev binutils golang-go nodejs ruby

.PHONY: demo test lint typecheck pytest deps-test install clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

install: $(VENV)/.created
	$(PIP) install -e .

demo: install
	$(PY) examples/demo.py
	@echo
	$(PY) examples/run_demo.py

deps-test: $(VENV)/.created
	@missing=""; for p in $(DEB_TEST_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test: install as root:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PIP) install -e '.[dev,metrics]'

lint: deps-test
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

typecheck: deps-test
	$(VENV)/bin/mypy --strict src

pytest: deps-test
	$(VENV)/bin/pytest -q

test: deps-test
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy --strict src
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
