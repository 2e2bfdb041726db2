# Set-up and everyday commands. `make run` and `make test` create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv run test lint bench clean

$(BIN)/estate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/estate

## run the gateway on its embedded defaults (SQLite file, embedded broker)
run: venv
	$(BIN)/estate run

## run the whole test suite (needs PostgreSQL and Mosquitto on loopback; .ci/run starts them)
test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$status

## the end-to-end throughput benchmark (see README "Benchmarks")
bench: venv
	$(BIN)/python -m benchmarks.pipeline --boards 100 --seconds 20

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
