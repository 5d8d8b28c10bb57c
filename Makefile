# make demo: the main job on the bundled default; make test: the test suite.
# Both create .venv from the pinned requirements on first use.
PY := .venv/bin/python
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)

.PHONY: demo test bench-calibration clean

.venv/.installed: requirements.txt requirements-test.txt setup.cfg setup.py
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements-test.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

demo: .venv/.installed
	$(PY) examples/demo.py

test: .venv/.installed
	$(PY) -m pytest -q

bench-calibration: .venv/.installed
	$(PY) benchmarks/calibration.py

clean:
	rm -rf .venv model build *.egg-info
