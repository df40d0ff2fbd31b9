"""Decoder-only LLM backbones (issue 13 item 4), on a tiny random Llama whose tokenizer has no pad
token: last-token pooling, the pad token, the weights' dtype in the cache key, refusals at the
edge, the teacher paths, the Ray Data feature path against the local one, and a real sweep."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import assert_study_agrees_with_mlflow, toy_prompts, write_tiny_llama
from trainable import backbone as bb
from trainable.config import ConfigError, FeaturesConfig, TrainConfig, build_config
from trainable.features import Plan, plan
from trainable.teacher import teacher_logits

TEXTS = [text for text, _ in toy_prompts(40)] + ["hi", "a much longer prompt about how to bake bread at home " * 2]


def two_splits(texts: list[str]) -> dict[str, list[str]]:
    """Two splits of unequal size, so the Ray Data path cuts full and short shards in each."""
    return {"train": texts[:30], "val": texts[30:]}


# -- pooling and padding ---------------------------------------------------------------------------


def test_last_pooling_picks_the_last_real_token_under_right_and_left_padding():
    hidden = torch.arange(5.0).view(1, 5, 1).expand(3, 5, 4)  # every state holds its own position
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]])
    assert bb.pool(hidden, right, "last")[:, 0].tolist() == [2.0, 4.0, 0.0]
    assert bb.pool(hidden, left, "last")[:, 0].tolist() == [4.0, 4.0, 4.0]
    assert bb.pool(hidden, right, "cls")[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert bb.pool(hidden, right, "mean")[:, 0].tolist() == [1.0, 2.0, 0.0]


def test_pad_token_is_set_to_eos_and_batches_pad_on_the_right(tiny_llama):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_llama).pad_token is None  # as shipped: no pad token
    tok = bb.load_tokenizer(tiny_llama)
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    enc = bb.tokenize(tok, ["hi", "how do i bake bread at home today?"], max_len=16)
    mask, ids = enc["attention_mask"], enc["input_ids"]
    n = int(mask[0].sum())
    assert mask[0, :n].all() and not mask[0, n:].any()  # real tokens first, then pads
    assert (ids[0, n:] == tok.eos_token_id).all() and ids[0, 0] == tok.bos_token_id


def test_last_token_features_equal_each_text_encoded_alone(tiny_llama, tmp_path):
    """With right padding the causal model's state at the last real token is that of the
    unpadded text, whatever else shares the batch: the features do not depend on batching."""
    texts = {"train": TEXTS[:6] + TEXTS[-2:]}
    feats = bb.cached_features(tiny_llama, "last", 32, texts, tmp_path, dtype="fp32")["train"]
    tok, model = bb.load_backbone(tiny_llama)
    with torch.no_grad():
        alone = torch.stack([model(**tok(t, truncation=True, max_length=32, return_tensors="pt")).last_hidden_state[0, -1]
                             for t in texts["train"]])  # the long one is cut at max_len, as in the batch
    assert feats.shape == (8, 32)
    torch.testing.assert_close(feats, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[0], feats[1])  # the texts really differ (not a constant vector)


# -- dtype, cache key and refusals at the edge ----------------------------------------------------


def test_bf16_and_fp32_extractions_have_their_own_cache_entries(tiny_llama, tmp_path):
    texts = two_splits(TEXTS)
    fp32 = bb.cached_features(tiny_llama, "last", 16, texts, tmp_path, dtype="fp32")
    bf16 = bb.cached_features(tiny_llama, "last", 16, texts, tmp_path, dtype="bf16")
    entries = sorted((tmp_path / "features").glob("*.pt"))
    assert len(entries) == 2  # no collision
    assert not torch.equal(fp32["train"], bf16["train"])  # bf16 weights really ran
    torch.testing.assert_close(bf16["train"], fp32["train"], atol=0.1, rtol=0.1)
    hits = bb.CACHE_STATS["feature_hits"]
    auto = bb.cached_features(tiny_llama, "last", 16, texts, tmp_path)  # auto on CPU is fp32: a hit
    assert bb.CACHE_STATS["feature_hits"] == hits + 1 and torch.equal(auto["train"], fp32["train"])
    assert bb.resolve_dtype("auto", "cuda") == "bf16" and bb.resolve_dtype("auto", "cpu") == "fp32"


def test_bad_llm_settings_are_refused_naming_the_field_and_allowed_values(tiny_llama, tiny_backbone):
    with pytest.raises(ConfigError, match=r"^pooling: 'cls' is the first token of the decoder-only backbone \(llama\)"
                                          r".*allowed for this backbone: last, mean$"):
        build_config(TrainConfig, {"backbone": tiny_llama, "pooling": "cls"})
    assert build_config(TrainConfig, {"backbone": tiny_backbone, "pooling": "cls"}).pooling == "cls"  # an encoder: fine
    with pytest.raises(ConfigError, match=r"backbone_dtype: .*\(got 'fp16'\); allowed: auto, fp32, bf16"):
        build_config(TrainConfig, {"backbone": tiny_llama, "backbone_dtype": "fp16"})
    with pytest.raises(ConfigError, match=r"^features\.actors: must be auto, 0 .* >= 1 \(got 'many'\)$"):
        build_config(TrainConfig, {"features": {"actors": "many"}})
    with pytest.raises(ConfigError, match=r"features\.device: .*allowed: auto, cpu, cuda"):
        build_config(TrainConfig, {"features": {"device": "tpu"}})


def write_sparse_llm(out: Path, rows: int = 40_000, cols: int = 32_768) -> None:
    """A model directory whose one safetensors file declares a rows x cols bf16 tensor (1.3B
    parameters): a valid file, written sparse, so it costs no disk and no memory."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    header = json.dumps({"embed.weight": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, 2 * rows * cols]}})
    with (out / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header.encode())
        fh.truncate(8 + len(header) + 2 * rows * cols)


def test_finetuning_an_llm_sized_teacher_is_refused_before_anything_loads(tmp_path):
    big = tmp_path / "big-llm"
    write_sparse_llm(big)
    with pytest.raises(ConfigError, match=r"^teacher: source 'finetune' would fine-tune all 1\.3B parameters .*"
                                          r"allowed at this size: source: model .* or source: column"):
        build_config(TrainConfig, {"backbone": str(big), "pooling": "last"})
    ok = build_config(TrainConfig, {"backbone": str(big), "pooling": "last",
                                    "teacher": {"source": "column", "column": "logits"}})
    assert ok.teacher.source == "column"


def test_llama_classifier_teacher_scores_each_text_as_if_alone(tmp_path, tiny_llama):
    """``teacher.source: model`` with a decoder-only classifier: it reads logits at the last
    non-pad token, which needs a pad token id the checkpoint does not have."""
    clf = tmp_path / "llama-clf"
    write_tiny_llama(clf, classifier=True)
    config = build_config(TrainConfig, {"backbone": tiny_llama, "pooling": "last", "cache_dir": str(tmp_path / "c"),
                                        "data": {"max_len": 32}, "teacher": {"source": "model", "path": str(clf)}})
    texts = {"train": TEXTS[:4], "val": TEXTS[-2:]}
    z = teacher_logits(config, texts, [0, 1, 0, 1], 2)
    alone = teacher_logits(config.model_copy(update={"cache_dir": str(tmp_path / "c2")}),
                           {f"t{i}": [t] for i, t in enumerate(texts["train"])}, [0, 1, 0, 1], 2)
    assert z["train"].shape == (4, 2) and z["val"].shape == (2, 2)
    torch.testing.assert_close(z["train"], torch.cat([alone[f"t{i}"] for i in range(4)]), atol=1e-5, rtol=1e-5)


# -- the Ray Data path ----------------------------------------------------------------------------


@pytest.fixture()
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_data_features_equal_the_local_ones_and_leave_shards(local_ray, tiny_backbone, tiny_llama, tmp_path, recwarn):
    texts = two_splits(TEXTS)  # 30 + 12 texts: shards of 8 give 4 + 2 in train, 2 in val (short last ones)
    # Ray is up, but no GPU and a tiny job: auto stays in this process
    assert plan(FeaturesConfig(), tiny_llama, 16, 42, "cpu") == Plan(0, "cpu")
    assert plan(FeaturesConfig(actors=0), tiny_llama, 16, 42, "cpu") == Plan(0, "cpu")
    forced = FeaturesConfig(actors=2, shard_texts=8)
    assert plan(forced, tiny_llama, 16, 42, "cpu") == Plan(2, "cpu")
    for name, backbone, pooling in (("bert", tiny_backbone, "mean"), ("llama", tiny_llama, "last")):
        local = bb.cached_features(backbone, pooling, 16, texts, tmp_path / name / "local", features=FeaturesConfig(actors=0))
        cache = tmp_path / name / "ray"
        remote = bb.cached_features(backbone, pooling, 16, texts, cache, features=forced)
        assert remote.keys() == local.keys()
        for split in texts:
            assert remote[split].shape == local[split].shape == (len(texts[split]), 32)
            torch.testing.assert_close(remote[split], local[split], atol=1e-5, rtol=1e-4)
        entries = list((cache / "features").glob("*.pt"))
        shards = sorted(p.name for p in (cache / "features").glob("*.shards/*.pt"))
        assert len(entries) == 1 and entries[0].with_suffix(".shards").is_dir()
        assert shards == ["train-00000000-00000008.pt", "train-00000008-00000016.pt", "train-00000016-00000024.pt",
                          "train-00000024-00000030.pt", "val-00000000-00000008.pt", "val-00000008-00000012.pt"]
        assert torch.equal(torch.load(entries[0], weights_only=True)["val"], remote["val"])

    # a killed extraction resumes by shard: only the missing shard is computed again
    shard_dir = entries[0].with_suffix(".shards")
    kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    (shard_dir / "val-00000008-00000012.pt").unlink()
    entries[0].unlink()
    again = bb.cached_features(tiny_llama, "last", 16, texts, cache, features=forced)
    torch.testing.assert_close(again["val"], remote["val"])
    now = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    assert now.keys() == kept.keys()
    assert [n for n in now if now[n] != kept.get(n)] == ["val-00000008-00000012.pt"]
    # every actor had shards to work on (Ray Data warns when the pool is larger than its input)
    assert not [w for w in recwarn if "concurrent actors" in str(w.message)]


# -- a real sweep ----------------------------------------------------------------------------------


def test_two_trial_sweep_on_the_tiny_llama(tmp_path, tiny_llama, toy_csv):
    """The whole product on a decoder-only backbone: last-token features, the fine-tuned teacher
    (a causal LM is small enough here), two trials, metrics in MLflow agreeing with Optuna."""
    from tests.test_sweep import OBJ, runs_of, sweep, write_spec

    spec_path = write_spec(tmp_path, tiny_llama, toy_csv, name="llama", trials=2, concurrency=2)
    spec = yaml.safe_load(spec_path.read_text())
    spec["train"] |= {"pooling": "last", "budget_steps": 4, "checkpoint_every": 0}
    spec_path.write_text(yaml.safe_dump(spec))
    out, uri = sweep(tmp_path, spec_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "2 finished, 0 failed" in out.stdout
    client, parents, children = runs_of(uri, "llama")
    for child in children:
        assert 0.0 <= child.data.metrics["accuracy"] <= 100.0 and 0.0 <= child.data.metrics["test_kd_alignment"] <= 100.0
    baseline = client.search_runs([parents[0].info.experiment_id], filter_string="tags.role = 'baseline'")[0]
    assert baseline.data.params["pooling"] == "last" and baseline.data.params["backbone"] == tiny_llama
    assert_study_agrees_with_mlflow(uri, "llama", 2, OBJ)
    assert len(list((tmp_path / "cache" / "teacher").glob("*.pt"))) == 1  # the Llama teacher, fine-tuned once


def test_the_sweep_waits_for_ray_before_preparing_features_that_may_run_on_it():
    """Where features are computed must not depend on whether Ray won the start-up race."""
    from sweeps.spec import load_spec
    from sweeps.tune import _features_may_use_ray

    assert not _features_may_use_ray(load_spec("pareto"), None)  # embedded Ray on this CPU machine
    assert _features_may_use_ray(load_spec("pareto"), "10.0.0.5:6379")  # a cluster may have GPUs
    assert _features_may_use_ray(load_spec("pareto", ["train.features.actors=2"]), None)
    assert not _features_may_use_ray(load_spec("pareto", ["train.features.actors=0"]), "10.0.0.5:6379")
