# Two commands do all the set-up on a fresh Debian 12 (Python 3.11, gcc, root):
#   make demo   create .venv, install portshard, run the main demo
#   make test   install what the tests need (Debian packages too), then ruff, mypy, pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Debian packages the tests drive for real (real programs, real load).
# gcc + libc6-dev (static libc.a), golang-go, nodejs, ruby: the unmodified servers of the
# interposition tests (tests/integration/test_interpose*.py) and of the recipes
# (tests/integration/test_recipes.py, with nginx below); systemd: `systemd-analyze verify` checks
# the example units (tests/integration/test_systemd.py).
# nftables (nft): the multi-host test bed's kube-proxy-style balancer (tests/integration/
# test_netbed.py, bench/netbed/; HAProxy, its other balancer, comes with DEB_BENCH_PKGS).
# uwsgi-core + uwsgi-plugin-python3: the uWSGI recipe (its pre-fork master, its own protocol
# for inherited sockets, SIGTERM as a reload); Debian's build runs the system python3.
DEB_TEST_PKGS := netcat-openbsd wrk iproute2 procps chromium gcc libc6-dev binutils golang-go nodejs ruby \
	systemd nftables uwsgi-core uwsgi-plugin-python3
# Debian packages the benchmarks drive (bench/): nginx and HAProxy are the alternatives portshard
# is compared with, wrk the HTTP load, iproute2 brings up loopback in the reload scenario's
# network namespace. `make test` installs them too: tests/integration/test_bench_quick.py runs
# `make bench-quick`'s suite. (On a machine with systemd, installing nginx also starts Debian's
# default site on port 80; the bench never uses it: it runs its own nginx on loopback.)
DEB_BENCH_PKGS := nginx haproxy wrk iproute2

.PHONY: demo test lint typecheck pytest deps-test install clean bench bench-quick bench-scale bench-crash bench-recipes deps-bench netbed soak

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
	@missing=""; for p in $(DEB_TEST_PKGS) $(DEB_BENCH_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test: install as root:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PIP) install -e '.[dev,metrics,bench,recipes]'

lint: deps-test
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

typecheck: deps-test
	$(VENV)/bin/mypy --strict src

# The suite in two passes (tests/conftest.py, SERIAL_FILES): the tests not marked `serial` on 2
# pytest-xdist workers, then the `serial` ones alone; both always run, and the exit status is
# the first failure's. A plain `.venv/bin/pytest -q` still runs everything, one test at a time.
PYTEST_RUN = par=0; ser=0; \
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup -m "not serial" || par=$$?; \
	$(VENV)/bin/pytest -q -m serial || ser=$$?; \
	if [ $$par != 0 ]; then exit $$par; fi; exit $$ser

pytest: deps-test
	$(PYTEST_RUN)

test: deps-test
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/mypy --strict src
	$(PYTEST_RUN)

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

# The benchmark suite (bench/README.md): every scenario, interleaved rounds, about 12 minutes
# on 2 vCPU; writes bench/results/ (report.md, results.json, PNG plots, headline.md).
# bench-quick: a small version of each scenario in under a minute (bench/results/quick/).
deps-bench: $(VENV)/.created
	@missing=""; for p in $(DEB_BENCH_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make bench: install as root:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PIP) install -e '.[bench]'

bench: deps-bench
	$(PY) -m bench
	$(MAKE) bench-scale
	$(MAKE) bench-crash
	$(MAKE) bench-recipes

# Issue 17's rows, after the suite: the supervisor's CPU against idle held connections (0, 1k,
# 10k, 50k; eBPF and classic BPF steering) and boot / reload --wait time against workers (1, 4,
# 16, 64; surge 1 and 8), one round each (about 15 min; more rounds: run the scripts by hand,
# bench/README.md). Write bench/results/held_cpu.json and scale_reload.json.
bench-scale: deps-bench
	$(PY) bench/experiments/held_cpu.py --rounds 1 --configs ebpf,cbpf
	$(PY) bench/experiments/scale_reload.py --rounds 1

# Issue 15's row: failed connections per supervisor upgrade and per supervisor crash (naive
# restart / old rule / portshard), 3 interleaved rounds (about 3 min). Writes
# bench/results/crash_upgrade.json.
bench-crash: deps-bench
	$(PY) bench/experiments/crash_upgrade.py --rounds 3

# Issue 12's row: reload --wait of the hypercorn, uvicorn and granian recipes (2 slots, --surge 1 and
# 2) under a curl-like load, against each server's own start-up measured in the same run,
# 3 interleaved rounds (about 4 min). Writes bench/results/recipe_reload.json.
bench-recipes: deps-bench
	$(PIP) install -q -e '.[recipes]'
	$(PY) bench/experiments/recipe_reload.py --rounds 3

bench-quick: deps-bench
	$(PY) -m bench --quick

# The multi-host test bed (bench/netbed/, root): three hosts under `portshard run` behind HAProxy
# (agent checks) and nftables DNAT (kube-proxy's way), in network namespaces it deletes again;
# a rolling reload and a drain through each, and requests/s through each balancer vs direct.
netbed: deps-test
	$(PY) -m bench.netbed

# The chaos soak (issue 14; bench/README.md "Chaos soak"): a supervisor under load while random
# reloads, scales, worker SIGKILLs, forking/setsid workers, control and metrics floods, bad
# configs and signals hit it. SOAK_SECONDS (default 600), SOAK_SEED (replay a run). Writes
# bench/results/soak/soak-SEED.{md,json} (and latest.*); exits non-zero if a property broke.
# A 35 s version runs in `make test` (tests/integration/test_chaos.py).
SOAK_SECONDS ?= 600
SOAK_SEED ?=
soak: deps-test
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) $(if $(SOAK_SEED),--seed $(SOAK_SEED)) -v
