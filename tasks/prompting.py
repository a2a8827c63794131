"""Turn a job request into the token ids the engine sees, with the model's own tokenizer.

The API uses this to refuse prompts longer than the model's context; the worker uses it to build the
engine input, so both count exactly the same tokens.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=4)
def load_tokenizer(model_path: Path):
    """The model's fast tokenizer (with its chat template). Loaded as PreTrainedTokenizerFast when the
    model folder has a tokenizer.json: AutoTokenizer would read the model's config and import torch
    on the way (about 500 MB in every API worker, for nothing the API does with it)."""
    if (Path(model_path) / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast  # only processes that count tokens import it

        return PreTrainedTokenizerFast.from_pretrained(str(model_path))
    from transformers import AutoTokenizer  # (importing this name alone imports torch)

    return AutoTokenizer.from_pretrained(str(model_path))


def prompt_token_ids(tokenizer, request: dict) -> list[int]:
    """Chat jobs go through the model's chat template (with the assistant turn opened)."""
    if request.get("messages") is not None:
        text = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(request["prompt"], add_special_tokens=True)
