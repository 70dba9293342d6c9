"""One file per merge method; importing this package registers them all (see registry.py)."""

from . import cat, core_space, ctm, iso, knots, linear_factors, mtc, tsv  # noqa: F401
from . import rmm  # noqa: F401,E402  (issue 7)
