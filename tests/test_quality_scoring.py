"""Scoring functions on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from inferq.training.train import SCHEMA_PATH
from quality.scoring import (
    bootstrap_interval,
    classify_scores,
    expand_scores,
    extract_scores,
    jaccard,
    wilson_interval,
)


def test_classify_accuracy_and_confusion() -> None:
    scores = classify_scores(
        ["pos", "neg", "pos", "neu", "pos"], ["pos", "neg", "neg", "neu", "neu"]
    )
    assert scores.n == 5 and scores.correct == 3
    assert scores.accuracy == pytest.approx(0.6)
    assert scores.confusion == {
        "pos": {"pos": 1},
        "neg": {"neg": 1, "pos": 1},
        "neu": {"neu": 1, "pos": 1},
    }


def test_extract_per_field_f1_and_schema_validity() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    refs = [
        {"brand": "Kestrel", "colour": "navy", "size": "M", "material": "linen"},
        {"brand": "Hjem", "colour": "white", "size": "large", "material": "solid oak"},
        {"brand": "Voltix", "colour": "black", "size": "1 m", "material": "TPE"},
    ]
    cands = [
        # all right, modulo case and spaces
        {"brand": "kestrel ", "colour": "Navy", "size": "M", "material": "linen"},
        # two right, two wrong
        {"brand": "Hjem", "colour": "black", "size": "small", "material": "solid oak"},
        # not valid against the schema (missing fields): scored as no fields at all
        {"brand": "Voltix"},
    ]
    scores = extract_scores(cands, refs, schema=schema)
    assert scores.field_exact == {
        "brand": pytest.approx(2 / 3),
        "colour": pytest.approx(1 / 3),
        "material": pytest.approx(2 / 3),
        "size": pytest.approx(1 / 3),
    }
    assert scores.all_fields_exact == pytest.approx(1 / 3)
    assert scores.schema_valid == pytest.approx(2 / 3)
    # 6 right of 8 predicted pairs and 12 expected pairs.
    assert scores.precision == pytest.approx(6 / 8)
    assert scores.recall == pytest.approx(6 / 12)
    assert scores.f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert scores.per_item == [1.0, 0.5, 0.0]


def test_extract_without_schema_counts_non_objects_invalid() -> None:
    scores = extract_scores([None, {"a": 1}], [{"a": 1}, {"a": 1}])
    assert scores.schema_valid == 0.5
    assert scores.field_exact == {"a": 0.5}


def test_expand_similarity_and_duplicates() -> None:
    assert jaccard("navy wool sweater", "wool sweater navy") == 1.0
    assert jaccard("navy sweater", "navy jacket") == pytest.approx(1 / 3)
    scores = expand_scores(
        [["navy sweater", "Navy  Sweater", "navy jacket"], ["red shoes"]],
        ["navy sweater", "blue boots"],
    )
    assert scores.per_item == [pytest.approx((1 + 1 + 1 / 3) / 3), 0.0]
    assert scores.similarity == pytest.approx((7 / 9) / 2)
    assert scores.duplicate_rate == pytest.approx(1 / 4)


def test_wilson_interval() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == 1.0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0.0, 0.5, 1.0, 1.0, 0.25, 0.75, 1.0, 0.0, 0.5, 1.0]
    first = bootstrap_interval(values, seed=1)
    assert first == bootstrap_interval(values, seed=1)
    assert first[0] < sum(values) / len(values) < first[1]
    assert bootstrap_interval([0.4] * 5) == (pytest.approx(0.4), pytest.approx(0.4))


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 candidates for 1 references"):
        classify_scores(["a", "b"], ["a"])
