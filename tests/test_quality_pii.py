"""PII stripping: each kind removed and counted, catalogue text left alone, JSON walked."""

from __future__ import annotations

import pytest

from inferq.training.train import held_out_products
from quality.pii import PiiStripper, build_stripper


@pytest.fixture(scope="module")
def stripper() -> PiiStripper:
    return build_stripper()


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("write to jane.doe@example.com today", "write to <EMAIL> today", {"email": 1}),
        (
            "call +44 20 7946 0958, (212) 555-0199 or +81 3-1234-5678",
            "call <PHONE>, <PHONE> or <PHONE>",
            {"phone": 3},
        ),
        ("paid with 4111 1111 1111 1111.", "paid with <CARD>.", {"card": 1}),
        ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN <IBAN>", {"iban": 1}),
        ("to DE89370400440532013000 now", "to <IBAN> now", {"iban": 1}),
        ("from 192.168.1.20 and 2001:db8::8a2e:370:7334", "from <IP> and <IP>", {"ip": 2}),
        (
            "dsn https://bob:hunter2@db.example.com/x",
            "dsn https://<CREDENTIALS>@db.example.com/x",
            {"credentials": 1},
        ),
    ],
)
def test_each_kind_is_removed_and_counted(
    stripper: PiiStripper, text: str, expected: str, counts: dict[str, int]
) -> None:
    result = stripper.strip_text(text)
    assert result.value == expected
    assert dict(result.counts) == counts


@pytest.mark.parametrize(
    "text",
    [
        # a card-shaped number failing the Luhn check, an IBAN failing its checksum
        "ref 4111 1111 1111 1112",
        "IBAN GB00 WEST 1234 5698 7654 32",
        # a URL without credentials, a user without a password
        "see https://example.com/a?b=1 and ssh://git@host/repo",
    ],
)
def test_invalid_lookalikes_stay(stripper: PiiStripper, text: str) -> None:
    result = stripper.strip_text(text)
    assert result.value == text
    assert not result.counts


@pytest.mark.parametrize(
    "address",
    ["ops@build.example", "jane@printer.local", "a.b@hr.internal", "j_doe@mail.corp"],
)
def test_email_on_a_private_tld_is_removed(stripper: PiiStripper, address: str) -> None:
    # An address is personal data whatever its TLD; the public-suffix list does not decide.
    result = stripper.strip_text(f"mail {address}, thanks")
    assert result.value == "mail <EMAIL>, thanks"
    assert dict(result.counts) == {"email": 1}


def test_version_pins_are_not_addresses(stripper: PiiStripper) -> None:
    text = "pin requests@2.31.0 and left-pad@1.3.0"
    assert stripper.strip_text(text).value == text


def test_catalogue_text_is_left_alone(stripper: PiiStripper) -> None:
    products = [item["text"] for item in held_out_products()]
    extra = (
        "Size 24 cm, 1.7 L, EU 42, US 10.5, W32 L34, SKU p0001, 10,000 mAh, €129.99, $19.99, "
        "45 x 45 x 75 cm, 27/11/2026, 2026-11-27, order 12345678, rated 4.5/5 by 2400 reviewers, "
        "version 1.2.3, 30 °C, 20% off"
    )
    for text in [*products, extra]:
        result = stripper.strip_text(text)
        assert result.value == text
        assert not result.counts


def test_names_are_not_caught_without_an_ner_model(stripper: PiiStripper) -> None:
    # Documented limit: the blank pipeline has no NER, so names stay.
    assert stripper.strip_text("John Smith ordered it").value == "John Smith ordered it"


def test_json_values_are_walked(stripper: PiiStripper) -> None:
    value = {
        "user": {"email": "a.b@example.org", "phones": ["+1 415 555 2671", "no phone"]},
        "card": 4111111111111111,
        "qty": 3,
        "ok": True,
        "note": None,
        "x@example.org": "key with an address",
    }
    result = stripper.strip(value)
    assert result.value == {
        "user": {"email": "<EMAIL>", "phones": ["<PHONE>", "no phone"]},
        "card": "<CARD>",
        "qty": 3,
        "ok": True,
        "note": None,
        "<EMAIL>": "key with an address",
    }
    assert dict(result.counts) == {"email": 2, "phone": 1, "card": 1}
    assert value["user"]["email"] == "a.b@example.org"  # the input is not modified


def test_names_are_caught_given_a_pipeline_that_tags_persons() -> None:
    import spacy

    # A real spaCy component that needs no download stands in for an NER model.
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": [{"LOWER": "john"}, {"LOWER": "smith"}]}])
    result = build_stripper(nlp=nlp).strip_text("John Smith ordered it, john@example.com")
    assert result.value == "<PERSON> ordered it, <EMAIL>"
    assert dict(result.counts) == {"person": 1, "email": 1}
