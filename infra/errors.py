"""The errors of `gammaray submit`/`status`/`logs`/`stop`: each message says why and what to do."""


class SubmitError(RuntimeError):
    """A job that must not or cannot be submitted; the message says why and what to do."""


class AuthError(SubmitError):
    """The cluster refused the request: missing (401) or wrong (403) token."""

