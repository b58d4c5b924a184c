"""Prompt-level methods (URIAL, conjugate prompting): they change what the model is asked, not the model, so they
have no plan part; server/frontend/prompt_methods.py runs them."""
from __future__ import annotations

from pydantic import Field

from ..conjugate import ConjugateSpec
from ..schema import Strict
from ..urial import UrialSpec
from .base import Method


class PromptSpec(Strict):
    """Prompt-level methods: they change what the model is asked, not the model (no worker plan)."""

    urial: UrialSpec | None = Field(None, description="URIAL: render the chat as in-context alignment examples "
                                                      "for a base model (chat completions only).")
    conjugate: ConjugateSpec | None = Field(None, description="Conjugate prompting: translate the prompt, generate, "
                                                              "translate the answer back (chat completions only; "
                                                              "needs the tenant's allow_conjugate switch).")


METHOD = Method("prompt", spec=PromptSpec, label="prompt-level steering")
