"""The one exception users see: a single line naming what is wrong and what to do."""


class MergeError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` as one line, without a traceback."""

    def __init__(self, message: str, *, adapter: str | None = None, module: str | None = None):
        where = " ".join(p for p in (f"adapter {adapter!r}" if adapter else "", f"module {module!r}" if module else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
