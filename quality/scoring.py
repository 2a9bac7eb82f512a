"""Pure scoring of candidate outputs against reference outputs, per task kind.

Each function takes parallel sequences (candidate i answers the same input as reference i)
and returns plain numbers, so evaluation runs, reports and tests share one definition of
"better". Nothing here touches a database or a model.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class ClassifyScores:
    n: int
    correct: int
    accuracy: float
    # confusion[reference][candidate] = count; the diagonal is what was right.
    confusion: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class ExtractScores:
    n: int
    # Share of items whose candidate value equals the reference value, per reference field.
    field_exact: dict[str, float]
    # Share of items with every field right.
    all_fields_exact: float
    # Micro-averaged over (field, value) pairs: a wrong value is one false positive and
    # one false negative; a missing field is a false negative.
    precision: float
    recall: float
    f1: float
    # Share of candidates that are JSON objects valid against the schema (1.0 with no schema).
    schema_valid: float
    # Per item: the share of its reference fields that are right (for bootstrap intervals).
    per_item: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExpandScores:
    n: int
    # Mean over items of the mean token Jaccard similarity of its variants to the reference.
    similarity: float
    # Share of variants that repeat an earlier variant of the same item (after normalising).
    duplicate_rate: float
    per_item: list[float] = field(default_factory=list)


def classify_scores(candidates: Sequence[str], references: Sequence[str]) -> ClassifyScores:
    """Accuracy and the confusion table of reference label x candidate label."""
    _same_length(candidates, references)
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    correct = 0
    for cand, ref in zip(candidates, references, strict=True):
        confusion[ref][cand] += 1
        correct += cand == ref
    n = len(references)
    return ClassifyScores(
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        confusion={ref: dict(row) for ref, row in confusion.items()},
    )


def normalise_value(value: Any) -> Any:
    """Strings compare stripped and case-folded ("Navy " == "navy"); other values as they are."""
    return value.strip().casefold() if isinstance(value, str) else value


def extract_scores(
    candidates: Sequence[Any],
    references: Sequence[Mapping[str, Any]],
    *,
    schema: Mapping[str, Any] | None = None,
) -> ExtractScores:
    """Per-field exact match, field-level precision/recall/F1 and schema validity.

    A candidate that is not a JSON object (or not valid against ``schema``) is scored as
    having no fields: all its reference fields count as missed.
    """
    _same_length(candidates, references)
    validator = Draft202012Validator(dict(schema)) if schema is not None else None
    hits: Counter[str] = Counter()
    true_pos = predicted = expected = valid = all_right = 0
    per_item: list[float] = []
    for cand, ref in zip(candidates, references, strict=True):
        ok = isinstance(cand, Mapping) and (validator is None or validator.is_valid(cand))
        valid += ok
        got = {k: normalise_value(v) for k, v in cand.items()} if ok else {}
        want = {k: normalise_value(v) for k, v in ref.items()}
        right = [k for k in want if k in got and got[k] == want[k]]
        hits.update(right)
        true_pos += len(right)
        predicted += sum(1 for v in got.values() if v not in (None, ""))
        expected += sum(1 for v in want.values() if v not in (None, ""))
        all_right += len(right) == len(want)
        per_item.append(len(right) / len(want) if want else 1.0)
    n = len(references)
    fields = sorted({k for ref in references for k in ref})
    precision = true_pos / predicted if predicted else 0.0
    recall = true_pos / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ExtractScores(
        n=n,
        field_exact={k: hits[k] / n for k in fields},
        all_fields_exact=all_right / n if n else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
        schema_valid=valid / n if n else 0.0,
        per_item=per_item,
    )


def tokens(text: str) -> set[str]:
    """Lower-cased word tokens (runs of unicode letters, digits and underscores)."""
    return {t.casefold() for t in _WORD.findall(text)}


def jaccard(a: str, b: str) -> float:
    """Token Jaccard similarity |A and B| / |A or B|; two empty texts are identical (1.0)."""
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def expand_scores(candidates: Sequence[Sequence[str]], references: Sequence[str]) -> ExpandScores:
    """Lexical similarity of each item's variants to its reference, and the duplicate rate.

    Similarity is token Jaccard (see :func:`jaccard`), averaged over an item's variants and
    then over items. A duplicate is a variant whose normalised text (case-folded, whitespace
    collapsed) equals an earlier variant of the same item.
    """
    _same_length(candidates, references)
    per_item: list[float] = []
    variants = duplicates = 0
    for cand, ref in zip(candidates, references, strict=True):
        per_item.append(sum(jaccard(v, ref) for v in cand) / len(cand) if cand else 0.0)
        seen: set[str] = set()
        for variant in cand:
            key = " ".join(variant.casefold().split())
            duplicates += key in seen
            seen.add(key)
        variants += len(cand)
    n = len(references)
    return ExpandScores(
        n=n,
        similarity=sum(per_item) / n if n else 0.0,
        duplicate_rate=duplicates / variants if variants else 0.0,
        per_item=per_item,
    )


def wilson_interval(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion: sane at 0/n and n/n, unlike the normal one."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; a fixed seed makes reruns agree exactly."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[math.floor(tail * (resamples - 1))]
    high = means[math.ceil((1 - tail) * (resamples - 1))]
    return (low, high)


def _same_length(candidates: Sequence[Any], references: Sequence[Any]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references")


# --- one task kind's run: its headline number, interval and details ------------------------

NO_ANSWER = "<no answer>"  # a failed candidate's label in the confusion table


@dataclass(frozen=True, slots=True)
class Scored:
    """What a run stores: the headline metric with its 95 % interval, and the details."""

    metric: str
    value: float
    ci: tuple[float, float]
    n: int
    scores: dict[str, Any]
    # Aligned with the inputs; None where the item had no reference answer and was skipped.
    per_item: list[float | None]


def score_task(
    task: str,
    inputs: Sequence[Mapping[str, Any]],
    candidates: Sequence[Any],
    references: Sequence[Any],
) -> Scored:
    """Score one task kind's answers; None candidates failed, None references are skipped.

    The headline metric: ``classify`` accuracy (Wilson interval), ``extract`` the mean share
    of fields right per item ("field accuracy"), ``expand`` the mean lexical similarity (both
    with a seeded bootstrap interval of the mean).
    """
    _same_length(candidates, references)
    keep = [i for i, ref in enumerate(references) if ref is not None]
    if not keep:
        raise ValueError("no item has a reference answer to score against")
    cands = [candidates[i] for i in keep]
    refs = [references[i] for i in keep]
    scorer = {"extract": _score_extract, "classify": _score_classify, "expand": _score_expand}
    if task not in scorer:
        raise ValueError(f"task kind {task!r} has no scorer")
    metric, value, ci, details, kept_scores = scorer[task]([inputs[i] for i in keep], cands, refs)
    per_item: list[float | None] = [None] * len(references)
    for index, score in zip(keep, kept_scores, strict=True):
        per_item[index] = score
    scores = {
        "metric": metric,
        "value": value,
        "failed": sum(1 for c in cands if c is None),
        "skipped": len(references) - len(keep),
        **details,
    }
    return Scored(metric, value, ci, len(keep), scores, per_item)


_Result = tuple[str, float, tuple[float, float], dict[str, Any], list[float]]


def _score_extract(
    inputs: Sequence[Mapping[str, Any]], cands: list[Any], refs: list[Any]
) -> _Result:
    valid = [
        isinstance(c, Mapping) and Draft202012Validator(dict(i.get("schema") or {})).is_valid(c)
        for i, c in zip(inputs, cands, strict=True)
    ]
    s = extract_scores([c if ok else None for c, ok in zip(cands, valid, strict=True)], refs)
    value = sum(s.per_item) / s.n
    details = {
        "field_exact": s.field_exact,
        "all_fields_exact": s.all_fields_exact,
        "precision": s.precision,
        "recall": s.recall,
        "f1": s.f1,
        "schema_valid": sum(valid) / s.n,
    }
    return "field_accuracy", value, bootstrap_interval(s.per_item), details, s.per_item


def _score_classify(_: Sequence[Mapping[str, Any]], cands: list[Any], refs: list[Any]) -> _Result:
    labels = [c if isinstance(c, str) else NO_ANSWER for c in cands]
    s = classify_scores(labels, [str(r) for r in refs])
    per_item = [float(c == r) for c, r in zip(labels, refs, strict=True)]
    details = {"correct": s.correct, "confusion": s.confusion}
    return "accuracy", s.accuracy, wilson_interval(s.correct, s.n), details, per_item


def _score_expand(_: Sequence[Mapping[str, Any]], cands: list[Any], refs: list[Any]) -> _Result:
    variants = [[str(v) for v in c] if isinstance(c, list) else [] for c in cands]
    texts = [" ".join(map(str, r)) if isinstance(r, list) else str(r) for r in refs]
    s = expand_scores(variants, texts)
    details = {"duplicate_rate": s.duplicate_rate}
    return "similarity", s.similarity, bootstrap_interval(s.per_item), details, s.per_item
