# Two commands do all set-up on a fresh machine:  make demo   and   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.medfuse-installed

.PHONY: setup demo test xvfb samples bench clean

setup: $(STAMP)

# torch is pinned here (a CPU wheel); the pyproject range stays loose for users.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

# napari tests need a real X server (offscreen Qt has no OpenGL context).
xvfb:
	@command -v xvfb-run >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libgl1 libegl1 libxkbcommon-x11-0 libdbus-1-3 >/dev/null; }

demo: setup
	$(VENV)/bin/medfuse demo --out demo_output

# Two test processes (pytest-xdist), each taking whole files so a module's shared fixtures are built once:
# about 18 min instead of 31.5 on the 2-core CI machine. PYTEST_JOBS=0 runs them in this one process.
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning while they wait, so two processes
# sharing two cores do not burn each other's time (two torch tests side by side: 61 s and 46 s, against 153 s and
# 133 s spinning; alone, 47 s against 39 s).
# One ITK thread per process: ITK's multi-threaded registration differs run to run, and an unconverged fit carries
# that to millimetres (a CI run failed on it); one thread repeats bit for bit and is not slower (17.8 min, against
# 18.8 with SimpleITK's default threads).
PYTEST_JOBS ?= 2
test: setup xvfb
	OMP_WAIT_POLICY=PASSIVE ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 xvfb-run -a -s "-screen 0 1280x1024x24" \
	  $(PY) -m pytest -q -n $(PYTEST_JOBS) --dist loadfile $(PYTEST_ARGS)

samples: setup
	$(PY) -m medfuse.phantom --write sample_volumes --overwrite

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_output .pytest_cache
