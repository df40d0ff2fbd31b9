"""User data (a local csv/json/jsonl/parquet file as data.name): what cannot work is refused with one
line naming the field or file, before anything is computed; odd but usable data just works.

Refusals are checked twice: at the unit level (``validate_inputs``) and through the real
``alignsweep train`` console script (exit 2, one ``error:`` line, no traceback, no cache written).
The usable cases train end to end on the tiny random BERT. Real pandas/torch/transformers throughout.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from trainable import data
from trainable.config import ConfigError, TrainConfig, build_config, deep_merge
from trainable.data import class_ids, validate_inputs
from trainable.loop import prepare_artifacts, train_loop

ALIGNSWEEP = Path(sys.executable).parent / "alignsweep"

WORDS = {"spam": ["prize", "winner", "offer", "cash", "deal"], "ham": ["meeting", "lunch", "report", "notes", "call"],
         "eggs": ["garden", "flower", "seed", "soil", "rain"]}


def prompts(n: int, labels: list) -> pd.DataFrame:
    """``n`` rows cycling through ``labels``; each label's texts come from its own vocabulary, so they
    can be learned, and each text is unique."""
    vocab = list(WORDS.values())
    rows = []
    for i in range(n):
        k = i % len(labels)
        words = vocab[k % len(vocab)]
        rows.append({"text": f"a short note about the {words[i % len(words)]} number {i}", "label": labels[k]})
    return pd.DataFrame(rows)


def config(base: dict, **over) -> TrainConfig:
    return build_config(TrainConfig, deep_merge(base, over))


def run_cli(*sets: str) -> subprocess.CompletedProcess:
    args = [str(ALIGNSWEEP), "train"] + [a for s in sets for a in ("--set", s)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory) -> dict[int, str]:
    """Tiny saved HF classifiers of 2 and 3 labels (a real save_pretrained directory each)."""
    from transformers import BertConfig, BertForSequenceClassification

    out = {}
    for n in (2, 3):
        path = tmp_path_factory.mktemp(f"clf{n}")
        cfg = BertConfig(vocab_size=128, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8, num_labels=n)
        BertForSequenceClassification(cfg).save_pretrained(path)
        out[n] = str(path)
    return out


# -- what cannot work: each case writes its file and says what the one-line error must name --------


def _one_class(d: Path) -> tuple[Path, list[str]]:
    path = d / "one_class.csv"
    prompts(60, ["a"]).to_csv(path, index=False)
    return path, []


def _too_few(d: Path) -> tuple[Path, list[str]]:
    path = d / "six_rows.csv"
    prompts(6, ["a", "b"]).to_csv(path, index=False)
    return path, []


def _latin1(d: Path) -> tuple[Path, list[str]]:
    path = d / "latin1.csv"
    df = prompts(60, ["pos", "neg"])
    df["text"] = df["text"] + " café crème"
    path.write_bytes(df.to_csv(index=False).encode("latin-1"))
    return path, []


def _garbage_csv(d: Path) -> tuple[Path, list[str]]:
    path = d / "garbage.csv"
    path.write_text('text,label\n"an opening quote that never closes,1\nmore,0\n')
    return path, []


def _garbage_json(d: Path) -> tuple[Path, list[str]]:
    path = d / "garbage.json"
    path.write_text("{this is not json at all")
    return path, []


def _unknown_encoding(d: Path) -> tuple[Path, list[str]]:
    path = d / "fine.csv"
    prompts(60, ["a", "b"]).to_csv(path, index=False)
    return path, ["data.encoding=klingon-8"]


def _teacher_column_width(d: Path) -> tuple[Path, list[str]]:
    path = d / "with_logits.csv"
    df = prompts(60, ["a", "b"])
    df["logits"] = ["[0.1, 0.2, 0.7]"] * len(df)
    df.to_csv(path, index=False)
    return path, ["teacher.source=column", "teacher.column=logits"]


REFUSALS: dict[str, tuple[Callable[[Path], tuple[Path, list[str]]], list[str]]] = {
    # case: (writes the file and returns it with any extra --set overrides, what the one line must contain)
    "one_class": (_one_class, ["data.label_column", "one_class.csv", "1 class ('a')", "at least 2"]),
    "too_few_items": (_too_few, ["data.name", "six_rows.csv", "train 4 / val 1 / test 1", "at least 10"]),
    "not_utf8": (_latin1, ["data.name", "latin1.csv", "not utf-8", "data.encoding"]),
    "garbage_csv": (_garbage_csv, ["data.name", "garbage.csv", "cannot read", "as CSV"]),
    "garbage_json": (_garbage_json, ["data.name", "garbage.json", "cannot read", "as JSON"]),
    "unknown_encoding": (_unknown_encoding, ["data.encoding", "klingon-8", "utf-8"]),
    "teacher_column_width": (_teacher_column_width, ["teacher.column", "with_logits.csv", "3 values", "2 classes"]),
}


def _as_fields(sets: list[str]) -> dict:
    out: dict = {}
    for s in sets:
        key, value = s.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unusable_data_is_refused_in_one_line_naming_the_field_and_file(case, tmp_path, tiny_backbone):
    build, must_name = REFUSALS[case]
    path, sets = build(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as info:
        # building the config is part of the check: data.encoding is refused there
        validate_inputs(config({"backbone": tiny_backbone, "cache_dir": str(cache), "data": {"name": str(path)}},
                               **_as_fields(sets)))
    message = str(info.value)
    assert "\n" not in message
    for part in must_name:
        assert part in message, (part, message)
    assert not cache.exists()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refuses_unusable_data_with_exit_2_before_computing_anything(case, tmp_path, tiny_backbone):
    build, must_name = REFUSALS[case]
    path, sets = build(tmp_path)
    cache = tmp_path / "cache"
    done = run_cli(f"data.name={path}", f"backbone={tiny_backbone}", f"cache_dir={cache}", "budget_steps=2", *sets)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for part in must_name:
        assert part in lines[0], (part, lines[0])
    assert not (cache / "features").exists() and not (cache / "teacher").exists()


def test_teacher_model_must_predict_the_datas_classes(tmp_path, tiny_backbone, classifier_dirs):
    path = tmp_path / "two.csv"
    prompts(60, ["a", "b"]).to_csv(path, index=False)
    base = {"backbone": tiny_backbone, "cache_dir": str(tmp_path / "cache"), "data": {"name": str(path)}}
    validate_inputs(config(base, teacher={"source": "model", "path": classifier_dirs[2]}))  # 2 == 2: accepted
    with pytest.raises(ConfigError, match=r"^teacher\.path: .* of 3 labels .* has 2 classes \(a, b\)"):
        validate_inputs(config(base, teacher={"source": "model", "path": classifier_dirs[3]}))
    done = run_cli(f"data.name={path}", f"backbone={tiny_backbone}", f"cache_dir={tmp_path / 'cache'}",
                   "teacher.source=model", f"teacher.path={classifier_dirs[3]}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: teacher.path: ") and classifier_dirs[3] in lines[0]
    assert "3 labels" in lines[0] and "2 classes" in lines[0]
    assert not (tmp_path / "cache" / "features").exists()


def test_too_few_items_names_the_classes_a_split_lacks(tmp_path):
    path = tmp_path / "rare.csv"
    df = prompts(60, ["a", "b"])
    df.loc[0, "label"] = "c"  # one item of class c: it lands in one split only
    df.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"lacks class 'c'.*need every class in train, val and test"):
        data.load_splits(data.DataConfig(name=str(path)), tmp_path)


def test_a_label_column_with_a_value_per_row_is_named_and_the_class_lists_stay_short(tmp_path):
    """A file made for something else: its "label" is a price, one class per row."""
    path = tmp_path / "prices.csv"
    df = prompts(60, ["a", "b"])
    df["label"] = [f"{1000 + 7 * i}" for i in range(60)]
    df.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"60 classes for 60 items: is data.label_column 'label' a class label\?") as err:
        data.load_splits(data.DataConfig(name=str(path)), tmp_path)
    assert "more)" in str(err.value) and len(str(err.value)) < 1000


def test_dropping_rows_that_leave_one_class_says_so(tmp_path):
    path = tmp_path / "mostly_empty.csv"
    df = prompts(60, ["a", "b"])
    df.loc[df["label"] == "b", "text"] = "   "
    df.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"has 1 class \('a'\) after dropping 30 of 60 rows \(30 with an empty text"):
        data.load_splits(data.DataConfig(name=str(path)), tmp_path)


# -- odd but usable data just works ------------------------------------------------------------------


def test_class_ids_are_contiguous_in_the_sorted_order_of_the_original_labels():
    assert class_ids([7, 3, 7]) == ([1, 0, 1], ["3", "7"], {"0": 3, "1": 7})
    assert class_ids([1, -1]) == ([1, 0], ["-1", "1"], {"0": -1, "1": 1})
    assert class_ids([10, 9, 2]) == ([2, 1, 0], ["2", "9", "10"], {"0": 2, "1": 9, "2": 10})  # numbers, not strings
    assert class_ids([3.0, 1.0]) == ([1, 0], ["1", "3"], {"0": 1, "1": 3})  # an int column that held a NaN
    assert class_ids(["spam", " ham", "spam"]) == ([1, 0, 1], ["ham", "spam"], {"0": "ham", "1": "spam"})
    assert class_ids([True, False]) == ([1, 0], ["False", "True"], {"0": False, "1": True})


def _train_end_to_end(path: Path, tiny_overrides: dict, **data_over) -> tuple[data.TextSplits, dict]:
    cfg = config(tiny_overrides, data={"name": str(path), **data_over}, budget_steps=4)
    art = prepare_artifacts(cfg)
    final = train_loop(cfg, lambda metrics, checkpoint=None: None, artifacts=art)
    assert art.teacher["train"].shape[1] == art.splits.num_classes  # the teacher speaks the data's classes
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in final.values()), final
    return art.splits, final


def test_string_labels_train_end_to_end(tmp_path, tiny_overrides):
    path = tmp_path / "three.jsonl"
    prompts(90, ["spam", "ham", "eggs"]).to_json(path, orient="records", lines=True)
    splits, _ = _train_end_to_end(path, tiny_overrides)
    assert splits.label_names == ["eggs", "ham", "spam"]
    assert splits.card["label_mapping"] == {"0": "eggs", "1": "ham", "2": "spam"}
    assert set(splits.labels["train"]) == {0, 1, 2}


@pytest.mark.parametrize("labels", [[3, 7], [-1, 1]])
def test_gapped_integer_labels_become_contiguous_class_ids(tmp_path, tiny_overrides, labels):
    path = tmp_path / "gapped.csv"
    prompts(60, labels).to_csv(path, index=False)
    splits, _ = _train_end_to_end(path, tiny_overrides)
    assert splits.num_classes == 2 and splits.label_names == [str(v) for v in labels]
    assert splits.card["label_mapping"] == {"0": labels[0], "1": labels[1]}
    assert {y for k in data.SPLITS for y in splits.labels[k]} == {0, 1}


def test_rows_without_text_or_label_are_dropped_counted_and_warned_once(tmp_path, tiny_overrides, caplog):
    df = prompts(66, ["a", "b"])
    df.loc[[0, 1], "text"] = ""
    df.loc[2, "text"] = " \t "
    df.loc[[3, 4], "label"] = None
    df.loc[5, "text"], df.loc[5, "label"] = None, None  # both: counted once, as an empty text
    path = tmp_path / "holes.csv"
    df.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="trainable.data"):
        splits, _ = _train_end_to_end(path, tiny_overrides)
        data.load_splits(data.DataConfig(name=str(path)), tmp_path)  # read again: no second warning
    assert splits.card["dropped_rows"] == {"empty_text": 4, "missing_label": 2}
    assert splits.card["n_rows"] == 66 and splits.card["n_items"] == 60
    assert sum(len(splits.texts[k]) for k in data.SPLITS) == 60
    warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "dropped 6 of 66 rows" in warned[0] and "holes.csv" in warned[0]


def test_unicode_texts_train_end_to_end(tmp_path, tiny_overrides):
    df = prompts(60, ["好", "😀"])
    extras = ["naïve café crème brûlée", "東京で会議があります", "emoji 🚀🔥 and ünïcödé", "Ελληνικά κείμενα",
              "עברית"]
    df["text"] = [f"{t} {extras[i % len(extras)]}" for i, t in enumerate(df["text"])]
    path = tmp_path / "unicode.parquet"
    df.to_parquet(path)
    splits, _ = _train_end_to_end(path, tiny_overrides)
    every = [t for k in data.SPLITS for t in splits.texts[k]]
    assert sorted(every) == sorted(df["text"])  # nothing lost or mangled on the way
    assert splits.card["label_mapping"] == {"0": "好", "1": "😀"}


def test_a_latin1_file_reads_with_data_encoding(tmp_path):
    path, _ = _latin1(tmp_path)
    s = data.load_splits(data.DataConfig(name=str(path), encoding="latin-1"), tmp_path)
    assert all(t.endswith("café crème") for k in data.SPLITS for t in s.texts[k])
    assert s.card["encoding"] == "latin-1"
