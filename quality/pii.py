"""Strip personal data from request inputs and outputs before they enter the evaluation pool.

Detection is Presidio's (``presidio-analyzer``), run offline: an ``AnalyzerEngine`` over a
blank spaCy pipeline (``spacy.blank("en")``: a tokenizer only, nothing downloaded) and only
the recognizers below, each of which validates its own matches:

=================  ==========================================================================
``<EMAIL>``        Presidio ``EmailRecognizer``'s pattern, any alphabetic TLD (``.local`` and
                   ``.corp`` too); ``name@1.2.3`` (a version) is not an address.
``<PHONE>``        Presidio ``PhoneRecognizer``: the ``phonenumbers`` matcher, numbers valid
                   in US, GB, DE, FR, IL, IN, CA or BR, or in any region when written with a
                   ``+`` country code.
``<CARD>``         Presidio ``CreditCardRecognizer``: 13-19 digit card patterns, Luhn-checked.
``<IBAN>``         Presidio ``IbanRecognizer``: country formats, mod-97 checksum.
``<IP>``           Presidio ``IpRecognizer``: IPv4 and IPv6 addresses, parsed by ``ipaddress``.
``<CREDENTIALS>``  Ours: the ``user:password`` part of a URL (``scheme://user:pass@host``);
                   the scheme, host and path stay.
``<PERSON>``       Only given a spaCy pipeline that tags PERSON entities (``nlp=``).
=================  ==========================================================================

What is *not* caught: person names, street addresses and other free-text identifiers with
the default (blank) pipeline; phone numbers written without a country code that are not
valid in the regions above; card numbers that fail the Luhn check; IBANs that fail the
checksum. Ordinary catalogue text (sizes, prices, SKUs, dates) is left alone.

Heavy imports happen in :func:`build_stripper`; the stripper is built once per process and
passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ENTITY_LABELS = {
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CARD>",
    "IBAN_CODE": "<IBAN>",
    "IP_ADDRESS": "<IP>",
    "URL_CREDENTIALS": "<CREDENTIALS>",
    "PERSON": "<PERSON>",
}
# The count key reported per kind: the placeholder without its brackets, lower case.
KIND = {entity: label.strip("<>").lower() for entity, label in ENTITY_LABELS.items()}
# Below this a match is not trusted; validated matches (Luhn, checksums) score 1.0, the
# phonenumbers matcher 0.4, IPv4 0.6, spaCy PERSON 0.85.
SCORE_THRESHOLD = 0.4
# Integers shorter than this cannot be any of the kinds above; longer ones are checked as text.
_MIN_DIGITS = 7


@dataclass(slots=True)
class Stripped:
    """A value with personal data replaced, and how many replacements of each kind."""

    value: Any
    counts: Counter[str] = field(default_factory=Counter)


class PiiStripper:
    """Replaces detected spans with placeholders, recursively over JSON values."""

    def __init__(self, analyzer: Any, *, entities: Sequence[str]) -> None:
        self._analyzer = analyzer
        self._entities = list(entities)

    def strip(self, value: Any) -> Stripped:
        """Strip a JSON value (dict, list, str, number, bool, None); keys are stripped too."""
        counts: Counter[str] = Counter()
        return Stripped(self._walk(value, counts), counts)

    def strip_text(self, text: str) -> Stripped:
        counts: Counter[str] = Counter()
        return Stripped(self._text(text, counts), counts)

    def _walk(self, value: Any, counts: Counter[str]) -> Any:
        if isinstance(value, str):
            return self._text(value, counts)
        if isinstance(value, dict):
            return {self._text(str(k), counts): self._walk(v, counts) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v, counts) for v in value]
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and len(str(abs(value))) >= _MIN_DIGITS
        ):
            text = self._text(str(value), counts)
            return value if text == str(value) else text
        return value

    def _text(self, text: str, counts: Counter[str]) -> str:
        if not text.strip():
            return text
        results = self._analyzer.analyze(
            text=text, language="en", entities=self._entities, score_threshold=SCORE_THRESHOLD
        )
        spans = _non_overlapping(results)
        for result in sorted(spans, key=lambda r: r.start, reverse=True):
            text = text[: result.start] + ENTITY_LABELS[result.entity_type] + text[result.end :]
            counts[KIND[result.entity_type]] += 1
        return text


def _non_overlapping(results: Sequence[Any]) -> list[Any]:
    """Keep the best of overlapping matches: URL credentials first (``pass@host`` also looks
    like an e-mail address), then the higher score, then the longer span."""
    kept: list[Any] = []
    ranked = sorted(
        results,
        key=lambda r: (r.entity_type != "URL_CREDENTIALS", -r.score, r.start - r.end, r.start),
    )
    for result in ranked:
        if all(result.end <= k.start or result.start >= k.end for k in kept):
            kept.append(result)
    return kept


def _email_domain_ok(address: str) -> bool:
    """Whether the part after ``@`` ends in a TLD: letters (or IDNA ``xn--``), two or more.

    Public or not: an address on ``.example`` or ``.internal`` names a person as surely as
    one on ``.com``. A numeric last label (``pkg@1.2.3``) is a version, not a domain.
    """
    tld = address.rpartition("@")[2].rpartition(".")[2]
    return (len(tld) >= 2 and tld.isalpha()) or tld.lower().startswith("xn--")


def build_stripper(*, nlp: Any = None) -> PiiStripper:
    """Build the analyzer once: Presidio's validating recognizers over a spaCy pipeline.

    Args:
        nlp: a spaCy ``Language`` whose ``doc.ents`` tag ``PERSON`` (say
            ``spacy.load("en_core_web_sm")``, installed separately) to also remove person
            names; by default a blank English pipeline (no download, no names).
    """
    import spacy
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        SpacyRecognizer,
    )

    class _LoadedSpacyEngine(SpacyNlpEngine):
        """Presidio's spaCy engine over a pipeline we built, instead of one it downloads."""

        def __init__(self, nlp: Any) -> None:
            super().__init__(models=[{"lang_code": "en", "model_name": nlp.meta["name"]}])
            self._pipeline = nlp

        def load(self) -> None:
            self.nlp = {"en": self._pipeline}  # type: ignore[assignment]

    class _AnyTldEmailRecognizer(EmailRecognizer):
        # Presidio checks the domain against the public-suffix list, which misses addresses
        # on private TLDs (``.local``, ``.corp``, ``.internal``): personal data all the same.
        def validate_result(self, pattern_text: str) -> bool:
            return _email_domain_ok(pattern_text)

    credentials = PatternRecognizer(
        supported_entity="URL_CREDENTIALS",
        patterns=[
            # userinfo with a password: after "scheme://", before "@host"
            Pattern("url userinfo", r"(?<=://)[^\s/?#@:]+:[^\s/?#@]*(?=@[^\s/?#@]+)", 1.0)
        ],
    )
    recognizers = [
        _AnyTldEmailRecognizer(),
        PhoneRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        credentials,
    ]
    entities = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS"]
    entities.append("URL_CREDENTIALS")
    if nlp is not None:
        recognizers.append(SpacyRecognizer(supported_entities=["PERSON"]))
        entities.append("PERSON")
    pipeline = nlp if nlp is not None else spacy.blank("en")
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    analyzer = AnalyzerEngine(
        registry=registry, nlp_engine=_LoadedSpacyEngine(pipeline), supported_languages=["en"]
    )
    return PiiStripper(analyzer, entities=entities)
