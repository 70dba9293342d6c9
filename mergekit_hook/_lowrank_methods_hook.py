"""Start-up hook of mergekit-lowrank: plugs our methods into the stock ``mergekit-yaml`` (imports only ``sys``).

mergekit 0.1.5 has no plugin discovery, so ``mergekit_lowrank.pth`` (and its PEP 829 twin
``mergekit_lowrank.start``) call ``install()`` at interpreter start. That only puts a finder on
``sys.meta_path``; nothing is imported until a program imports mergekit itself. Then, right after

- ``mergekit.merge_methods`` finishes executing: ``lowrank_methods.mergekit_plugin.register()``
  (not earlier: its import chain starts inside the half-initialised ``mergekit.merge``);
- ``mergekit.merge`` finishes executing: ``lowrank_methods.mergekit_plugin.patch()``, before
  ``run_yaml``'s ``from mergekit.merge import run_merge`` binds the name.

A failure inside the plugin is a warning: mergekit's own methods keep working.
"""

import sys

_ACTIONS = {"mergekit.merge_methods": "register", "mergekit.merge": "patch"}


def _run(action):
    try:
        __import__("lowrank_methods.mergekit_plugin")
        getattr(sys.modules["lowrank_methods.mergekit_plugin"], action)()
    except Exception as exc:  # never break mergekit itself
        import warnings

        warnings.warn(f"mergekit-lowrank: plugin not loaded ({action}): {exc!r}", stacklevel=2)


class _Finder:
    """Finds nothing itself: wraps the real loader of a watched module so our action runs after it."""

    pending = dict(_ACTIONS)

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        action = cls.pending.get(fullname)
        if action is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            cls.pending.pop(fullname, None)
            if not cls.pending and cls in sys.meta_path:
                sys.meta_path.remove(cls)
            _run(action)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install():
    """Idempotent; the ``.pth`` line and the ``.start`` entry point both call it."""
    for module, action in list(_Finder.pending.items()):
        if module in sys.modules:  # mergekit already imported (install() called by hand): act now
            _Finder.pending.pop(module)
            _run(action)
    if _Finder.pending and _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
