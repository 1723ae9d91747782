# Everything runs from the project's own virtual environment (.venv).
VENV   ?= .venv
PY     := $(VENV)/bin/python
NCF    := $(abspath $(VENV))/bin/ncf
DEMO   ?= demo

.PHONY: install demo test test-all bench bench-score bench-train bench-memory bench-ray lint clean

install: $(VENV)/.installed

# torch first, pinned: it takes the local CPU wheel instead of a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

# end to end on embedded SYNTHETIC data: fit -> export -> score
demo: install
	mkdir -p $(DEMO)
	cd $(DEMO) && $(NCF) demo-data data.csv --users-out users.parquet
	cd $(DEMO) && $(NCF) fit data.csv
	cd $(DEMO) && $(NCF) export model.onnx
	cd $(DEMO) && $(NCF) score --users users.parquet --k 50
	$(PY) -c "import polars as pl; print(pl.read_parquet('$(DEMO)/topn.parquet').head(10))"

test: install
	$(PY) -m pytest -q

bench: bench-score bench-train bench-memory bench-ray

bench-score: install
	$(PY) tests/benchmarks/bench_score.py

bench-train: install
	$(PY) tests/benchmarks/bench_train.py

# peak RSS of `ncf score` at N, 10N and 100N users: flat = memory bounded
bench-memory: install
	$(PY) tests/benchmarks/bench_memory.py

# local engine vs Ray Data on the large synthetic grid (a local Ray instance on this machine)
bench-ray: install
	$(PY) tests/benchmarks/bench_ray.py

lint: install
	$(VENV)/bin/ruff check ncf export batch tests

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
