"""The method descriptor and registry: name → function, parameter model, paper, output kind.

A method is a pure function of one module's tensors::

    fn(factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MethodContext) -> ModuleResult

``factors`` has one entry per adapter, in recipe order; an adapter that lacks the module gives the
rank-0 ``LoraFactors.zeros``. Methods do no I/O and run on whatever device their inputs are on.
To add a method: write ``core/methods/<name>.py`` with a ``@method(...)`` function; it is discovered.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, Union

from pydantic import Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo
from typing_extensions import Annotated

from lowrank_methods.core.errors import MergeError, RecipeError, short
from lowrank_methods.core.params import MethodParams, ScaledParams
from lowrank_methods.core.types import LoraFactors, MethodContext, ModuleResult

@dataclass(frozen=True)
class Paper:
    """What a method implements, for its card's citation: BibTeX key, title, authors (BibTeX field), year, URL."""

    key: str
    title: str
    authors: str
    year: int
    url: str
    venue: str | None = None

    def bibtex(self) -> str:
        eprint = self.url.rsplit("/", 1)[-1]
        fields = [f"  title = {{{self.title}}}", f"  author = {{{self.authors}}}", f"  year = {{{self.year}}}",
                  f"  eprint = {{{eprint}}}", "  archivePrefix = {arXiv}", f"  url = {{{self.url}}}"]
        if self.venue:
            fields.insert(3, f"  note = {{{self.venue}}}")
        return "@misc{" + self.key + ",\n" + ",\n".join(fields) + "\n}"


@dataclass(frozen=True)
class Link:
    """Where a method without a paper is defined (e.g. another library's documentation)."""

    text: str
    url: str


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Sequence[LoraFactors], Sequence[float], MethodParams, MethodContext], ModuleResult]
    params: type[MethodParams]
    pretty_name: str
    paper: Paper | None = None
    link: Link | None = None
    output: Literal["adapter", "bundle"] = "adapter"
    in_mergekit: bool = True  # False for aliases of mergekit's own names (task_arithmetic, linear)
    summary: str = ""
    # (params, weights, ranks of each adapter at a module, 0 where absent, ctx) -> None or raises MergeError;
    # the refusals a method can make before computing, so that `validate` makes them too
    check: Callable[[MethodParams, Sequence[float], Sequence[int]], None] | None = None

    @property
    def reference_url(self) -> str | None:
        return self.paper.url if self.paper else self.link.url if self.link else None

    def __call__(self, factors: Sequence[LoraFactors], weights: Sequence[float], params: MethodParams,
                 ctx: MethodContext | None = None) -> ModuleResult:
        """Run the method on one module; an error it raises names the module (``ctx.module``)."""
        ctx = ctx if ctx is not None else MethodContext()
        try:
            return self.fn(factors, weights, params, ctx)
        except MergeError as e:
            e.module = e.module or ctx.module or None
            raise

    # -- parameters: a flat recipe mapping, discriminated on `rule` where the method takes one ------------------
    @functools.cached_property
    def variants(self) -> dict[str, type[MethodParams]]:
        """rule name → the method's parameter model with that rule's knobs (only those); {} without ``rule``."""
        from lowrank_methods.core.rules import RULES

        field = self.params.model_fields.get("rule")
        if field is None:
            return {}
        return {r: create_model(f"{self.params.__name__}[{r}]", __base__=(self.params, RULES[r]),
                                rule=(Literal[r], r)) for r in typing.get_args(field.annotation)}

    @functools.cached_property
    def _union(self) -> TypeAdapter:
        return TypeAdapter(Annotated[Union[tuple(self.variants.values())], Field(discriminator="rule")])

    def parse_params(self, values: dict) -> MethodParams:
        if self.variants:
            values = {"rule": self.params.model_fields["rule"].default, **values}
            refused = self._other_rules_knob(values)
            if refused:
                raise RecipeError(f"bad parameters for method {self.name!r}: {refused}")
        try:
            if self.variants and values["rule"] in self.variants:
                return self._union.validate_python(values)
            return self.params.model_validate(values)
        except ValidationError as e:
            raise RecipeError(f"bad parameters for method {self.name!r}: "
                              f"{_one_line(e, self.parameter_names, tags=set(self.variants))}") from e

    def _other_rules_knob(self, values: dict) -> str | None:
        """A knob the chosen rule does not read would be silently ignored: say which rule reads it instead."""
        rule = values["rule"]
        if rule not in self.variants:
            return None
        own = self.variants[rule].model_fields
        for key in sorted(values):
            users = sorted(r for r, v in self.variants.items() if key in v.model_fields and key not in self.params.model_fields)
            if users and key not in own:
                return f"{key} is read by rule {' / '.join(users)}, not by rule {rule!r}; remove it or choose that rule"
        return None

    @functools.cached_property
    def fields(self) -> dict[str, FieldInfo]:
        """Every parameter a recipe may set (attribute name → field): the method's own, then each rule's knobs."""
        fields = dict(self.params.model_fields)
        for variant in self.variants.values():
            for n, f in variant.model_fields.items():
                fields.setdefault(n, f)
        return fields

    def knobs_of(self, rule: str) -> set[str]:
        """The rule knobs (recipe names) that ``rule`` reads in this method."""
        own = self.params.model_fields
        return {f.alias or n for n, f in self.variants[rule].model_fields.items() if n not in own}

    @property
    def parameter_names(self) -> list[str]:
        """The names a recipe may set (aliases where a field has one)."""
        return [f.alias or n for n, f in self.fields.items()]

    def validator(self, name: str) -> Callable:
        """The type check mergekit's ``evaluate_setting`` applies to each value of parameter ``name`` (lax, like
        mergekit's ``TypeAdapter(value_type)``); unknown names pass through and are refused by ``parse_params``."""
        for n, f in self.fields.items():
            if name in (n, f.alias):
                return _type_adapter(f.annotation).validate_python
        return lambda value: value


_METHODS: dict[str, Method] = {}


def method(name: str, *, params: type[MethodParams] = ScaledParams, pretty_name: str, paper: Paper | None = None,
           link: Link | None = None, output: Literal["adapter", "bundle"] = "adapter", in_mergekit: bool = True,
           check=None):
    """Decorator: register ``fn`` under ``name`` (its docstring's first line is the one-line summary)."""

    def register(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[name] = Method(name, fn, params, pretty_name, paper, link, output, in_mergekit,
                                doc[0] if doc else "", check)
        return fn

    return register


@functools.cache
def _load() -> None:
    """Import every module of ``core/methods/``: each registers its methods (discovery, no list to keep)."""
    from lowrank_methods.core import methods

    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def get_method(name: str) -> Method:
    _load()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known methods: {', '.join(sorted(_METHODS))}"
        raise RecipeError(f"unknown merge_method {short(name)}{hint}")
    return _METHODS[name]


def list_methods() -> list[Method]:
    _load()
    return [_METHODS[k] for k in sorted(_METHODS)]


@functools.lru_cache(maxsize=None)
def _type_adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


def _one_line(err: Exception, known: list[str] | None = None, tags: set[str] = frozenset()) -> str:
    """A pydantic error as one line; a name the model does not take gets a "did you mean" from ``known``; the
    discriminator's tag (the rule) that a union puts first in each error's location is left out."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc_parts = tuple(e.get("loc", ()))
            if loc_parts and loc_parts[0] in tags:
                loc_parts = loc_parts[1:]
            e = {**e, "loc": loc_parts}
            loc = ".".join(short(x, 40) if not isinstance(x, str) else x[:40] for x in e.get("loc", ())) or "parameters"
            if e.get("type") == "extra_forbidden" and known is not None:
                close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known) or 'none'}"
                parts.append(f"{loc}: not a parameter of this method; {hint}")
                continue
            parts.append(f"{loc}: {e.get('msg')}")
        return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")
    return str(err).replace("\n", " ")
