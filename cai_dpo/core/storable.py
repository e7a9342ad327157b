"""What PostgreSQL can store: valid Unicode text without NUL, finite numbers.

Checked at every edge where outside text comes in (requests, constitutions, imports), so a bad
value is refused naming its field instead of failing as a database error.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Annotated, Any

from pydantic import AfterValidator, GetJsonSchemaHandler


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store this text, or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


# Deeper than this, a value is refused: nothing the service stores needs it, and serialising a
# value nested some hundreds deep fails (a 500 where a 422 belongs).
MAX_JSON_DEPTH = 32


def find_unstorable(value: Any) -> tuple[str, str] | None:
    """The first place in a JSON-like value that PostgreSQL cannot store, and why; None if none.

    Text must be valid Unicode without NUL, numbers finite (JSON has no NaN), nesting at most
    MAX_JSON_DEPTH deep. Iterative, so a deeply nested upload cannot exhaust the stack.
    """
    queue = deque([("", value, 0)])
    while queue:
        path, item, depth = queue.popleft()
        if isinstance(item, dict | list) and depth >= MAX_JSON_DEPTH:
            return path, f"nested more than {MAX_JSON_DEPTH} deep"
        if isinstance(item, str):
            if reason := text_problem(item):
                return path, reason
        elif isinstance(item, float) and not math.isfinite(item):
            return path, f"{item} is not a JSON number"
        elif isinstance(item, dict | list):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and (reason := text_problem(key)):
                    return path, f"a key {reason}"  # the key itself could not be shown back
                queue.append((f"{path}.{key}" if path else str(key), child, depth + 1))
    return None


def check_storable(value: Any) -> Any:
    """A pydantic validator: the value unchanged, or a ValueError saying where and why."""
    if found := find_unstorable(value):
        where, reason = found
        raise ValueError(f"{reason} at {where}" if where else reason)
    return value


class SchemaPattern:
    """States in the JSON schema (the API's OpenAPI document) a pattern a validator enforces."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return handler(core_schema) | {"pattern": self.pattern}


NO_NUL = r"^[^\u0000]*$"

# Text and JSON that PostgreSQL can store: anything else is refused with the field's name.
StorableText = Annotated[str, AfterValidator(check_storable), SchemaPattern(NO_NUL)]
StorableJson = Annotated[dict[str, Any], AfterValidator(check_storable)]
