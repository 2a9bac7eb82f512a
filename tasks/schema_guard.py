"""JSON schemas and model outputs, bounded so that neither can stall a process checking them.

A caller's schema is checked at submit: its size and nesting (limits from the settings), and
its regexes, which must compile in RE2. Outputs are then checked against the schema with RE2
(linear time) wherever jsonschema would use Python's backtracking ``re``: a pattern such as
``(a+)+$`` on a few thousand characters of model output would otherwise hold the worker for
hours. RE2 has no backreferences or lookaround, so schemas using them are refused at submit.

Outputs are read as the database can store them: NaN and infinite numbers are refused
(``1e999`` reads as ``inf``, which Postgres's ``json`` rejects), and any failure to read or
check one output (too many digits, too deep, a ``$ref`` that leads nowhere) is that output's
error, never an exception for its batch.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import re2
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import extend

# Values holding data, not subschemas: a "pattern" key inside them is not a regex.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """How large a caller's schema may be: characters of its JSON text, levels of nesting.

    The API builds them from the settings (``INFERQ_MAX_SCHEMA_CHARS``,
    ``INFERQ_MAX_SCHEMA_DEPTH``); the defaults are the settings' defaults.
    """

    max_chars: int = 100_000
    max_depth: int = 32


def nesting_depth(value: Any) -> int:
    """Levels of objects and arrays, counted without recursion (a deep value must not
    overflow the stack of the code measuring it)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(schema: dict[str, Any], limits: SchemaLimits) -> None:
    """Refuse a schema nested deeper than the limit, naming the limit and its setting.

    Raises:
        ValueError: the schema is too deeply nested.
    """
    depth = nesting_depth(schema)
    if depth > limits.max_depth:
        raise ValueError(
            f"the schema is nested {depth} levels deep; the limit is {limits.max_depth} "
            "(INFERQ_MAX_SCHEMA_DEPTH)"
        )


def check_chars(canonical: str, limits: SchemaLimits) -> None:
    """Refuse a schema whose JSON text is over the limit, naming the limit and its setting.

    Raises:
        ValueError: the schema is too large.
    """
    if len(canonical) > limits.max_chars:
        raise ValueError(
            f"the schema is {len(canonical)} characters as JSON; the limit is "
            f"{limits.max_chars} (INFERQ_MAX_SCHEMA_CHARS)"
        )


def pattern_problem(schema: dict[str, Any]) -> str | None:
    """Why a regex of the schema cannot be matched in linear time, or None."""
    for pattern in _patterns(schema):
        try:
            _compiled(pattern)
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            return (
                f"pattern {pattern!r} is not supported ({reason}): patterns are matched in "
                "linear time (RE2), without backreferences or lookaround"
            )
    if _has_keyword(schema, "unevaluatedProperties") and _has_keyword(schema, "patternProperties"):
        return "unevaluatedProperties cannot be combined with patternProperties"
    return None


def _patterns(schema: Any) -> Iterator[str]:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key == "patternProperties" and isinstance(value, dict):
                yield from value
            stack.append(value)


def _has_keyword(schema: Any, keyword: str) -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if keyword in node:
                return True
            stack.extend(v for k, v in node.items() if k not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            stack.extend(node)
    return False


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def _search(pattern: str, text: str) -> bool:
    return _compiled(pattern).search(text) is not None


# jsonschema's own versions of these keywords call re.search; these call RE2.


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in known and not any(_search(pattern, key) for pattern in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(extra) for extra in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


@functools.cache
def _validator_class() -> type[Validator]:
    keywords = {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    }
    validator: type[Validator] = extend(Draft202012Validator, keywords)
    return validator


class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NonFinite(text)
    return number


def _no_constant(text: str) -> Any:
    raise _NonFinite(text)


def load_output(text: str) -> Any:
    """An output's JSON value, as the database can store it.

    Raises:
        ValueError: not JSON, a non-finite number, too many digits, or too deeply nested;
            the message says which.
    """
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except _NonFinite as exc:
        raise ValueError(f"output has a non-finite number: {exc}") from None
    except RecursionError:
        raise ValueError("output is nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's digit limit
        raise ValueError(f"output is not JSON: {exc}") from None


def output_problem(schema: dict[str, Any], value: Any) -> str | None:
    """Why a value does not satisfy the schema, or None; never raises for the value's sake."""
    try:
        error = next(iter(_validator_class()(schema).iter_errors(value)), None)
    except RecursionError:
        return "output is nested too deeply to check against the schema"
    except Exception as exc:  # an unresolvable $ref, a regex RE2 refuses, ...
        return f"the schema cannot be checked: {type(exc).__name__}: {str(exc)[:300]}"
    return None if error is None else f"output does not match the schema: {error.message}"
