"""The errors users see: each one line naming what is wrong, where, and what to do.

A small hierarchy so that callers (and tests) can tell kinds apart, each keeping its fields and its cause::

    MergeError                      anything the user can fix
      RecipeError                   the recipe file or a parameter in it
      AdapterError                  an input adapter
        UnsupportedAdapterError     a valid adapter whose update is not scale·B@A (DoRA, lora_bias, …)
        CorruptAdapterError         files that break their own format (headers, configs, NaN)
      BundleError                   a reversible bundle
      BaseModelError                the base model of ``output: model`` (missing, unreadable, not fitting)
      HubError                      the Hugging Face Hub
      OutputError                   the output directory
        OutputExistsError           it exists and may not be replaced
      ComputeError                  a module's result would be wrong (NaN/Inf, a failed decomposition)

A message never names a command-line flag itself: ``flag`` and ``flag_hint`` say which flag would help,
and each CLI adds the hint only when the running command has that flag.
"""

from __future__ import annotations

MAX_MESSAGE = 300  # characters of one error line, at most


class MergeError(Exception):
    """A user-facing error. The CLIs print ``str(err)`` as one line, without a traceback."""

    def __init__(self, message: str, *, adapter: str | None = None, module: str | None = None,
                 flag: str | None = None, flag_hint: str | None = None):
        self.message = message
        self.adapter = adapter
        self.module = module
        self.flag = flag            # e.g. "--overwrite": the option that would get past this error
        self.flag_hint = flag_hint  # e.g. "pass --overwrite to replace it"
        super().__init__(message)

    def __str__(self) -> str:
        where = " ".join(p for p in (f"adapter {self.adapter!r}" if self.adapter else "",
                                     f"module {self.module!r}" if self.module else "") if p)
        return f"{where}: {self.message}" if where else self.message

    def line(self, flags: frozenset[str] | set[str] = frozenset()) -> str:
        """The one line to print, with the flag hint when the running command has ``self.flag``."""
        text = str(self)
        if self.flag and self.flag_hint and self.flag in flags:
            text = f"{text}; {self.flag_hint}"
        return one_line(text)


class RecipeError(MergeError):
    """The recipe (YAML, methods, parameters) is not usable."""


class AdapterError(MergeError):
    """An input adapter cannot be merged."""


class UnsupportedAdapterError(AdapterError):
    """A well-formed adapter of a kind whose update is not ``scale · B @ A``."""


class CorruptAdapterError(AdapterError):
    """An adapter whose files break their own format (safetensors header, adapter_config.json, NaN/Inf)."""


class BundleError(MergeError):
    """A reversible bundle is missing, malformed or corrupt."""


class BaseModelError(MergeError):
    """The base model of ``output: model`` is missing, unreadable or does not fit the adapters."""


class HubError(MergeError):
    """The Hub refused or could not be reached."""


class OutputError(MergeError):
    """The output directory cannot be written as asked."""


class OutputExistsError(OutputError):
    """The output exists and is not ours to replace (or another merge is writing it)."""


class ComputeError(MergeError):
    """A module's result would be wrong: a non-finite value or a failed decomposition."""


def error_line(err: BaseException, flags=frozenset()) -> str:
    """The one line a CLI prints for ``err``: ours with its flag hint, an OSError as 'what: path'."""
    if isinstance(err, MergeError):
        return err.line(flags)
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return one_line(f"{err.strerror}{where}")
    return one_line(str(err) or type(err).__name__)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line of at most ``limit`` characters (control characters and newlines flattened)."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def short(value, limit: int = 60) -> str:
    """A repr of ``value`` short enough for an error line (recipes may hold huge or hostile values)."""
    import reprlib

    r = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, limit, limit
    return one_line(r.repr(value), limit)
