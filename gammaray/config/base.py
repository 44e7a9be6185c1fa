"""The parts every section shares: the base model and the two error types."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending dotted path."""


class RunError(RuntimeError):
    """A run stopped for a reason its message explains in full, with what to do next (storage
    unreachable for longer than storage.retry_time_s, a checkpoint refused, a resume that does not
    match the run): the CLI prints the message alone, without a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

