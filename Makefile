# `make run` and `make test` are all a new machine needs: each installs
# what it uses into .venv first (pinned by constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto' | sort)
PROTOC = $(BIN)/python -m grpc_tools.protoc -Iprotos \
	--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
	--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(1) \
	$(PROTOS)
# Shipped with the stubs as they are: the callers' gRPC service config (retries, timeouts).
STUB_DATA := $(shell find protos -name '*.json' | sort)
COPY_STUB_DATA = for file in $(STUB_DATA); do cp "$$file" "$(1)/$${file\#protos/}"; done

.PHONY: install run test fuzz lint format proto check-generated bench floods lock clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

install: $(INSTALLED)

## Serve on GRPC_PORT (50051). Without DATABASE_URL: embedded PostgreSQL in .data/.
## WORKERS server processes share the port; here, unless set, one per core.
run: $(INSTALLED)
	@if [ -n "$$DATABASE_URL" ]; then $(BIN)/alembic upgrade head; fi
	WORKERS=$${WORKERS:-$$(nproc 2>/dev/null || echo 1)} $(BIN)/python -m service

# The tests of the API contract (those on the shared test server), which
# `make test` runs again through a real PgBouncer in transaction mode, and
# again with a streaming standby serving the shared server's reads.
CONTRACT_TESTS := tests/test_create_get_lookup.py tests/test_list_users.py \
	tests/test_update_delete.py tests/test_hostile_input.py tests/test_bounded_errors.py \
	tests/test_deadlock.py tests/test_fuzz.py tests/test_watch.py

## Lint everything, then run the tests against real PostgreSQL, and the
## contract's tests again through PgBouncer (DB_POOLER=pgbouncer), and again
## with a streaming standby serving reads (DATABASE_REPLICA_URLS).
test: lint
	$(BIN)/pytest
	$(BIN)/pytest --via-pgbouncer $(CONTRACT_TESTS)
	$(BIN)/pytest --via-replica $(CONTRACT_TESTS)

## Fuzz every RPC for minutes (`make test` runs a bounded fuzz); -rA prints what it reached.
fuzz: $(INSTALLED)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/test_fuzz.py -rA

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	@$(MAKE) --no-print-directory check-generated

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Regenerate generated/ from protos/.
proto: $(INSTALLED)
	rm -rf generated/pat && mkdir -p generated
	$(call PROTOC,generated)
	$(call COPY_STUB_DATA,generated)

## Fail when generated/ is not what protos/ produce.
check-generated: $(INSTALLED)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(call PROTOC,$$tmp) >/dev/null && $(call COPY_STUB_DATA,$$tmp) && \
	diff -r --exclude=__pycache__ "$$tmp/pat" generated/pat \
	  || { echo "generated/ is stale: run 'make proto' and commit the result" >&2; exit 1; }

## Service vs raw asyncpg, workers, PgBouncer, RSS; table + bench-results.json.
## e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--skip-rss --only get,lookup"
BENCH_ARGS ?=
bench: $(INSTALLED)
	$(BIN)/python -m bench $(BENCH_ARGS)

## Hostile and overloading callers against a real server (see bench/floods/).
floods: $(INSTALLED)
	$(BIN)/python -m bench.floods

## Re-pin constraints.txt after changing dependencies in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[dev]'
	.lock-venv/bin/pip freeze --exclude pat-users > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
