"""The prefix-cache benchmark's own parts (ops/prefix_bench.py): its workload and how it reads vLLM's
counters. The benchmark itself runs two real vLLM workers (`make bench-prefix`)."""

from __future__ import annotations

from ops.prefix_bench import counters, sessions
from tasks.prompting import load_tokenizer


def test_sessions_are_seeded_and_each_has_a_long_system_prompt_of_its_own(model_path):
    convs = sessions(8, 3, 50, seed=7)
    assert convs == sessions(8, 3, 50, seed=7) and convs != sessions(8, 3, 50, seed=8)
    assert len({c["system"] for c in convs}) == 8 and len({c["session"] for c in convs}) == 8
    assert all(len(c["questions"]) == 3 for c in convs)
    tokenizer = load_tokenizer(model_path)
    lengths = [len(tokenizer(c["system"])["input_ids"]) for c in convs]
    assert all(850 <= n <= 1150 for n in lengths), lengths  # "50 sentences make about 1000 tokens"


def test_counters_sum_each_series_over_its_labels_and_ignore_the_rest():
    text = "\n".join([
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0',
        'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 800.0',
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 640.0',
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 2000.0',
        'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9',
        'switchyard_jobs_total{status="succeeded"} 5.0',
    ])
    assert counters(text) == {"queries": 2000.0, "hits": 640.0, "prompt_tokens": 2000.0}
    assert counters("") == {"queries": 0.0, "hits": 0.0, "prompt_tokens": 0.0}
