# fuseflow: `make demo`, `make test`, `make bench` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# fuseflow serve's gRPC protos, without their `tensorflow` requirement (pyproject.toml)
TFS_API := tensorflow-serving-api==2.21.0

.PHONY: install native browser demo test test-all bench bench-serve bench-defaults fuzz zoo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve]'
	$(PY) -m pip install -q --no-deps '$(TFS_API)'
	touch $(STAMP)

install: $(STAMP) native

native: $(STAMP)
	$(PY) -c "import fuseflow.native as n; n.load_op_library()"

demo: install
	$(PY) -m bench.demo

# Headless Chromium renders the graph picture in tests/test_graph_html.py. If it can't be
# installed, say why; those tests are then skipped, or fail where CI=true.
BROWSER_LOG := .build/browser-install.log
browser:
	@mkdir -p .build; command -v chromium >/dev/null 2>&1 || \
	  command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    >$(BROWSER_LOG) 2>&1 || \
	  { echo "warning: chromium could not be installed (apt-get as $$(id -un)), so"; \
	    echo "  tests/test_graph_html.py will $$(case "$$CI" in true|1|yes) echo FAIL \
	      '(CI=true)';; *) echo be skipped;; esac). apt-get said:"; \
	    tail -n 3 $(BROWSER_LOG) | sed 's/^/    /'; }

# -rs lists every skipped test with its reason in the summary. Test files run side by side,
# one per core (at most 4; a file's tests stay together, so its module fixtures are built
# once); PYTEST_WORKERS=0 runs them one after another.
PYTEST_WORKERS ?= auto
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile)
test: install browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -rs --durations=15 $(XDIST) -m "not slow" tests

test-all: install browser
	$(PY) -m pytest -q -rs $(XDIST) tests

# The bench extra (tf2onnx, onnxruntime) alone, without reinstalling fuseflow. If it does
# not install, the benchmark still runs and its onnxruntime rows say n/a.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'], sep='\n')" > $(VENV)/bench-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/bench-requirements.txt && touch $@ \
		|| echo "warning: the bench extra did not install; onnxruntime rows will say n/a"

bench: install $(BENCH_STAMP)
	$(PY) -m bench.run --json .build/bench.json

# fuseflow serve under wrk (Debian's HTTP load generator): 1 and 2 replicas, original vs
# compiled, p50/p99 and req/s at fixed concurrency. TIMING_LOCK=FILE holds FILE (flock)
# around each timed run.
bench-serve: install
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } >/dev/null 2>&1 || \
	  { echo "bench-serve needs wrk (apt-get install wrk)"; exit 1; }
	$(PY) -m bench.serve --json .build/bench-serve.json $(if $(TIMING_LOCK),--lock $(TIMING_LOCK))

# Every zoo model compiled with the user's defaults (auto, timed placement), then timed
# against the original side by side: never slower, family by family.
bench-defaults: install
	$(PY) -m bench.defaults --json .build/bench-defaults.json $(if $(TIMING_LOCK),--lock $(TIMING_LOCK))

# Many more random graphs than make test's 10 fixed ones, from a new seed each run.
fuzz: install
	FUSEFLOW_FUZZ_EXAMPLES=1000 $(PY) -m pytest -q -rs --timeout=0 tests/test_fuzz.py \
		--hypothesis-show-statistics

# Every zoo model on every backend it is pinned for, then the README table (coverage, error,
# batch-1 speed-up measured side by side).
ZOO_OUT := .build/zoo
zoo: install
	rm -rf $(ZOO_OUT)
	FUSEFLOW_ZOO_OUT=$(abspath $(ZOO_OUT)) $(PY) -m pytest -q -rs tests/zoo; status=$$?; \
	  $(PY) -m bench.zoo $(ZOO_OUT) && exit $$status

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .build build *.egg-info fuseflow/native/_fuseflow_op*.so
