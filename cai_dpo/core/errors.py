"""Errors of the service's own making, named by the field at fault: routes and console pages show
them as a 4xx whose message names the field (`app/errors.py`)."""

from __future__ import annotations


class FieldError(ValueError):
    """A request error tied to one field; rendered as a 4xx whose message names the field."""

    def __init__(self, field: str, message: str, status_code: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code
