"""Engine statistics under vLLM's names.

With vLLM, the numbers are vLLM's own: its PrometheusStatLogger (workers.engine.VllmEngine asks for it)
registers the `vllm:*` series in the GPU worker's default registry and updates them every engine step.
The SimulatedEngine has no vLLM inside, so `SimulatedEngineStats` reports the same series for the
counts it does have (requests running and waiting, prompt and generation tokens), read from the engine
when Prometheus scrapes; KV-cache and prefix-cache series exist only with vLLM. `switchyard_node_info`
says which engine a node runs.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: vLLM's label names on every engine series (vllm/v1/metrics/loggers.py): the served model, the engine index
LABELS = ["model_name", "engine"]


class SimulatedEngineStats:
    """A collector over a SimulatedEngine's `running`, `waiting`, `prompt_tokens` and `generation_tokens`."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def describe(self):
        return self._families(sample=False)

    def collect(self):
        return self._families(sample=True)

    def _families(self, sample: bool) -> list:
        e, values = self.engine, [self.model_name, "0"]
        specs = [
            (GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
             lambda: e.running),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             lambda: e.waiting),
            (CounterMetricFamily, "vllm:prompt_tokens", "Number of prefill tokens processed.", lambda: e.prompt_tokens),
            (CounterMetricFamily, "vllm:generation_tokens", "Number of generation tokens processed.",
             lambda: e.generation_tokens),
        ]
        families = []
        for kind, name, help_text, value in specs:
            family = kind(name, f"{help_text} (SimulatedEngine)", labels=LABELS)
            if sample:
                family.add_metric(values, value())
            families.append(family)
        return families


_registered: dict[int, SimulatedEngineStats] = {}  # id(registry) → the collector registered there


def register_simulated(engine, model_name: str, registry=REGISTRY) -> SimulatedEngineStats:
    """Report `engine`'s counts in `registry`, in place of an engine registered there before (a process
    reports one engine, as vLLM's stat logger replaces its predecessor's series)."""
    previous = _registered.pop(id(registry), None)
    if previous is not None:
        try:
            registry.unregister(previous)
        except KeyError:  # already taken out
            pass
    stats = _registered[id(registry)] = SimulatedEngineStats(engine, model_name)
    registry.register(stats)
    return stats
