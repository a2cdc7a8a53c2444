"""The one error type glp raises for a user's mistake."""


class GlpError(ValueError):
    """A user-facing error: bad input, named with what would be valid.

    The CLI prints these as one red line and exits non-zero, without a traceback.
    """


class ParamError(GlpError):
    """A bad parameter value, named by its field; the CLI names the option instead.

    ``str(error)`` reads ``"density 2: choose a fraction in (0, 1]"``; :meth:`for_option`
    gives the same line with the option as the user typed it (``--density 2: ...``).
    """

    def __init__(self, param: str, value: object, valid: str):
        self.param, self.value, self.valid = param, value, valid
        super().__init__(f"{param} {value}: choose {valid}")

    def for_option(self, option: str) -> str:
        return f"{option} {self.value}: choose {self.valid}"
