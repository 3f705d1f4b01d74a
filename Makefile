# The two commands: `make demo` (a real end-to-end audit on real data) and `make test`.
# Both create .venv when it is missing and install the project with the pinned versions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# the suite in 2 processes (CI has 2 cores; most of a test's time is waiting for Ray, S3 or a
# subprocess): each module runs whole in one process, the modules that share a session fixture
# (the digits audits, ...) or must not overlap (the two 2-node clusters) together in one
# (tests/conftest.py: GroupScheduling replaces --dist's scheduler)
TEST_WORKERS ?= 2

.PHONY: test demo venv browser bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

venv: $(STAMP)

# Headless Chromium for the HTML-report and explorer tests, and chromedriver for Selenium
# (Debian's packages; skipped when already there)
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium / chromium-driver; the browser tests will fail"; \
	  else echo "warning: chromium or chromedriver missing (install Debian's 'chromium' and 'chromium-driver' packages)"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m vog_ray.demo

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/reduce.py
	$(PY) bench/pipeline.py
	$(PY) bench/incremental.py
	$(PY) bench/explore.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
