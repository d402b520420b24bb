"""User-facing errors: raised for bad input, printed as one clear line by the entry point."""


class RecsysLMError(Exception):
    """A user mistake (config key, path, data): the message says what and where, no traceback."""


class ConfigError(RecsysLMError):
    """A config value that cannot work: names the key, the value and what was expected."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config key `{key}` = {value!r}: {expected}")


class DataError(RecsysLMError):
    """Data that cannot be read: names the file (and line/column where known)."""


class UnknownItem(RecsysLMError):
    """Item ids a served model does not have (never trained on, never added, or removed)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:5]) + (" ..." if len(self.ids) > 5 else "")
        super().__init__(f"unknown item id(s): {shown}")
