# The two commands a new machine needs (only Python 3.11 and make):
#   make run    the demo app behind the dispatcher, with 3 instances
#   make test   lint, run the whole test suite, report branch coverage
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test format docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/pyramid-lb serve development.ini

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -f .coverage .coverage.*
	@# 4 workers on 2 cores: most tests wait on processes and sockets
	$(BIN)/coverage run -m pytest -n 4 --dist loadfile $(PYTEST_ARGS)
	@# a process the tests SIGKILL leaves an empty data file behind
	find . -maxdepth 1 -name '.coverage.*' -empty -delete
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache *.egg-info

docs: $(BIN)/.installed
	$(BIN)/python -m pyramid_lb.reference README.md
