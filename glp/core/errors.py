"""The one error type glp raises for a user's mistake."""


class GlpError(ValueError):
    """A user-facing error: bad input, named with what would be valid.

    The CLI prints these as one red line and exits non-zero, without a traceback.
    """
