# keysvc: `make run` serves a development instance, `make test` runs the whole suite.
# Both install what is missing first and are safe to repeat.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE ?= .keysvc
LISTEN ?= 127.0.0.1:50051
PROCESSES ?= 1
# Test processes (pytest-xdist): one per core; each has its own tokens and PostgreSQL database.
TEST_WORKERS ?= auto
PROTO := protos/keysvc/api/v1/keysvc.proto
GEN := keysvc/api/v1/keysvc_pb2.py

.PHONY: run test lint deps system venv proto bench clean

run: deps
	$(BIN)/keysvc serve --dev --state-dir $(STATE) --listen $(LISTEN) --processes $(PROCESSES)

test: deps lint
	@url=$$(scripts/test-postgres start) && \
	  KEYSVC_TEST_PG_URL=$$url $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	    $(PYTEST_ARGS); rc=$$?; \
	  scripts/test-postgres stop; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

# Errors, pyflakes, line length and import order ([tool.ruff]), and types ([tool.mypy]).
lint: venv proto
	$(BIN)/ruff check keysvc tests bench setup.py
	$(BIN)/mypy

bench: deps
	$(BIN)/python bench/run.py

deps: system venv proto

system:
	@scripts/ensure-system-packages

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,test]'
	touch $@

proto: $(GEN)

$(GEN): $(PROTO) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. $(PROTO)

clean:
	rm -rf $(VENV) $(GEN) keysvc/api/v1/keysvc_pb2_grpc.py keysvc/api/v1/keysvc_pb2.pyi \
	  keysvc/api/v1/keysvc_pb2_grpc.pyi
