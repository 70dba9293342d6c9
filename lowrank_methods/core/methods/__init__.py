"""One file per merge method; every module here is imported (and its methods registered) by ``core.method``."""
