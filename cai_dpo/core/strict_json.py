"""Request models that take JSON's types as they are: `false` is no 0.0 and `0` no `false`, `"5"`
no 5 (pydantic's lax mode coerced all three), but `1.0` is an integer, as JSON Schema has it
(where a float holds it exactly: up to 2**53)."""

from __future__ import annotations

import functools
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


def _is_int(annotation: Any) -> bool:
    """Whether a field's type is `int`, possibly optional or annotated (never `bool`)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_int(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is_int(args[0])
    return annotation is int


class StrictJson(BaseModel):
    model_config = ConfigDict(strict=True)

    @classmethod
    @functools.cache
    def _int_fields(cls) -> frozenset[str]:
        return frozenset(name for name, field in cls.model_fields.items() if _is_int(field.annotation))

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if isinstance(data, dict) and (ints := cls._int_fields()):
            return {
                k: int(v) if k in ints and isinstance(v, float) and v.is_integer() and abs(v) <= 2**53 else v
                for k, v in data.items()
            }
        return data
