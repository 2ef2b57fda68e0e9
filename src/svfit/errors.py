"""Errors that mean "the user asked for something that cannot be done": the CLI prints them as one line."""


class SVFitUserError(Exception):
    """A mistake the user can fix (bad name, bad value, unusable input); its message says what to do."""


class UnknownChoiceError(SVFitUserError, KeyError):
    """An unknown task or method name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
