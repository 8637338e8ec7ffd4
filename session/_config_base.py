"""The base of every FacePay configuration section (session.config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    # hide_input_in_errors: a rejected value is not echoed into the error (and so into
    # logs): it may be a secret (an admin token, a template key). The error still names
    # the field and the bound.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
