"""Teacher logits z_T for every split, computed once and cached by content hash.

The default teacher is the backbone fine-tuned end to end on the train split: a stronger
model than the frozen-feature student (DESIGN §5 measured 90% vs 81% on `safety`), which is
what makes distillation worth having. Its fine-tuning seed is fixed, independent of the trial
seed, so every trial of a sweep distils from the same teacher. It runs in fp32 in the driver,
so TrainConfig refuses it for backbones above ``FINETUNE_MAX_PARAMS`` (an 8B LLM): there the
teacher is a classifier fine-tuned elsewhere (``source: model``) or logits in the data (``column``).
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from trainable.backbone import (Encoder, atomic_save, backbone_fingerprint, load_backbone, load_tokenizer, record_miss,
                                tokenize)
from trainable.config import TrainConfig

TEACHER_SEED = 0
CACHE_STATS = {"teacher_hits": 0, "teacher_misses": 0}


def teacher_logits(config: TrainConfig, texts: dict[str, list[str]], train_labels: list[int], num_classes: int,
                   column: dict[str, list[list[float]]] | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """z_T for each split in ``texts``, from the source the config names.

    ``train_labels`` are the clean labels: the teacher is the trusted model, and label noise
    corrupts only what the student's CE terms see. The cache key is the texts and those labels,
    so every label-noise level of a sweep distils from one teacher."""
    t = config.teacher
    if t.source == "column":
        return {split: _as_logits(torch.tensor(rows, dtype=torch.float32)) for split, rows in (column or {}).items()}
    recipe = json.dumps({"src": t.source, "path": t.path, "epochs": t.epochs, "lr": t.lr, "bs": t.batch_size,
                         "max_len": config.data.max_len, "pooling": config.pooling, "seed": TEACHER_SEED}, sort_keys=True)
    backbone = t.path if t.source == "model" else config.backbone
    data_key = hashlib.sha256(json.dumps([texts, train_labels], sort_keys=True).encode()).hexdigest()
    key = hashlib.sha256(f"{backbone_fingerprint(backbone)}|{data_key}|{recipe}".encode()).hexdigest()[:20]
    path = config.resolved_cache_dir() / "teacher" / f"{key}.pt"
    if path.is_file():
        CACHE_STATS["teacher_hits"] += 1
        return torch.load(path, weights_only=True)
    CACHE_STATS["teacher_misses"] += 1
    record_miss(config.resolved_cache_dir(), "teacher", key)
    if t.source == "model":
        model = _load_classifier(t.path)
    else:
        model = finetune_teacher(config, texts["train"], train_labels, num_classes, device)
    logits = {split: _predict(model, tok_texts, config.data.max_len, device) for split, tok_texts in texts.items()}
    atomic_save(logits, path)
    return logits


def _as_logits(rows: torch.Tensor) -> torch.Tensor:
    """A probabilities column becomes log-probabilities (equal to logits up to a constant)."""
    is_prob = bool((rows >= 0).all() and torch.allclose(rows.sum(-1), torch.ones(len(rows)), atol=1e-3))
    return rows.clamp_min(1e-8).log() if is_prob else rows


class _Classifier(nn.Module):
    def __init__(self, tokenizer, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.tokenizer, self.encoder, self.head = tokenizer, encoder, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.pool_embeddings(self.encoder.embed(input_ids), attention_mask))


class _HFClassifier(nn.Module):
    def __init__(self, tokenizer, model: nn.Module):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _load_classifier(path: str) -> nn.Module:
    """A local HF sequence classifier. A decoder-only one (``LlamaForSequenceClassification``)
    reads its logits at the last token that is not ``config.pad_token_id``, and refuses batches
    without one: it gets the tokenizer's pad (eos where the tokenizer has none, ``with_padding``)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _HFClassifier(tokenizer, model)


def finetune_teacher(config: TrainConfig, texts: list[str], labels: list[int], num_classes: int, device: str) -> nn.Module:
    """Fine-tune backbone + linear head end to end with cross-entropy (AdamW, linear decay)."""
    t = config.teacher
    torch.manual_seed(TEACHER_SEED)
    tokenizer, model = load_backbone(config.backbone)
    encoder = Encoder(model, config.pooling)
    clf = _Classifier(tokenizer, encoder, nn.Linear(model.config.hidden_size, num_classes)).to(device)
    enc = tokenize(tokenizer, texts, config.data.max_len)
    y = torch.tensor(labels)
    steps_per_epoch = max(1, -(-len(texts) // t.batch_size))
    opt = torch.optim.AdamW(clf.parameters(), lr=t.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (t.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    clf.train()
    for _ in range(t.epochs):
        for idx in torch.randperm(len(texts), generator=gen).split(t.batch_size):
            logits = clf(enc["input_ids"][idx].to(device), enc["attention_mask"][idx].to(device))
            loss = F.cross_entropy(logits, y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf


@torch.no_grad()
def _predict(model: nn.Module, texts: list[str], max_len: int, device: str, batch_size: int = 64) -> torch.Tensor:
    model.eval().to(device)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(model.tokenizer, texts[i : i + batch_size], max_len)
        out.append(model(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)
