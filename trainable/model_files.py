"""What a local model directory says about itself, read without loading any weights: its
parameter count (from the safetensors headers) and whether it is a decoder-only LM (from
config.json). Torch-free, so checking a config at the edge stays cheap even for an 8B backbone."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

BYTES_PER_BIN_PARAM = 4
"""A pytorch_model*.bin has no header to read: its size / 4 assumes fp32 weights (an estimate)."""


def parameter_count(directory: str | Path) -> int | None:
    """Parameters stored in a model directory, or None when it holds no weight files.

    Exact for safetensors (each file's header lists every tensor's shape: a few KB read per
    shard, whatever the model's size); estimated from file sizes for legacy .bin weights."""
    path = Path(directory)
    if not path.is_dir():
        return None
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return sum(_safetensors_params(f) for f in shards)
    bins = sorted(path.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in bins) // BYTES_PER_BIN_PARAM if bins else None


def _safetensors_params(file: Path) -> int:
    """Element count of every tensor in one safetensors file: an 8-byte little-endian header
    length, then a JSON header of {name: {dtype, shape, data_offsets}} (plus __metadata__)."""
    with file.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def model_type(directory: str | Path) -> str | None:
    """config.json's ``model_type`` (``llama``, ``bert``, ...), or None when there is none."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("model_type")


def is_decoder_only(directory: str | Path) -> bool:
    """Whether the model attends causally: each token sees only the tokens before it.

    A model type transformers builds a causal LM for but no masked LM is decoder-only (llama,
    mistral, qwen2, gpt2, ...); BERT-like encoders have both heads. The mapping is transformers'
    own, so a new architecture is classified without a list kept here. It imports torch, so
    callers ask only when the answer matters (``pooling: cls``)."""
    kind = model_type(directory)
    if kind is None:
        return False
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if config.get("is_encoder_decoder"):
        return False
    if config.get("is_decoder"):  # e.g. a BERT saved as BertLMHeadModel: causal attention too
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
