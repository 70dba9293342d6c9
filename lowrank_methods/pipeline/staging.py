"""Writing an output directory without ever losing a file that is not ours.

An output of ours carries a marker, ``.mergekit-lowrank.json``, listing every file we wrote. Only three
kinds of existing ``OUT`` may be replaced: an empty directory, and (when the caller allows it) one whose
marker lists everything in it. Anything else — a project, a photo folder, an input adapter — is refused.

The work happens in ``.OUT.tmp-XXXX/`` beside ``OUT`` (``out/`` becomes ``OUT``; ``scratch/`` holds temporary
inputs), under an advisory lock on ``.OUT.lock``, so two merges to one ``OUT`` never interleave. The commit is
a rename that fails rather than replaces (``renameat2`` ``RENAME_NOREPLACE``; ``RENAME_EXCHANGE`` to swap in
for a previous output, which stays intact until the new one is in place). A work directory left by a killed
run carries ``staging.json`` and is removed by the next run to the same ``OUT``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from lowrank_methods.core.errors import OutputError, OutputExistsError
from lowrank_methods.formats.output_marker import owned_files, walk, write_marker

STAGING_FORMAT = "mergekit-lowrank/staging"
VERSION = 1


def check_output(out: str | Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an ``OUT`` we may not write (nothing is written). Returns ``OUT`` as an absolute path."""
    out = Path(os.path.abspath(out))
    for source in inputs:
        source = Path(os.path.abspath(source))
        if out == source or out in source.parents:
            raise OutputExistsError(f"output {out} is (or holds) the input {source}; write the merge somewhere else")
        if source in out.parents:
            raise OutputExistsError(f"output {out} lies inside the input {source}; write the merge somewhere else")
    state = _state(out)
    if state == "owned" and not overwrite:
        raise OutputExistsError(f"output {out} already holds a previous merge", flag="--overwrite",
                                flag_hint="pass --overwrite to replace it")
    return out


def _state(out: Path) -> str:
    """'absent', 'empty' or 'owned' (a previous output of ours, nothing else in it); refuses anything else."""
    if not os.path.lexists(out):
        return "absent"
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; choose a new directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "empty"
    owned = owned_files(out)
    if owned is None:
        listing = ", ".join(entries[:3]) + (f", … ({len(entries)} entries)" if len(entries) > 3 else "")
        raise OutputExistsError(f"output {out} exists and holds files this tool did not write ({listing}); "
                                "choose a new directory")
    foreign = sorted(str(p.relative_to(out)) for p in walk(out) if p.is_file() or p.is_symlink()
                     if str(p.relative_to(out)) not in owned)
    if foreign:
        raise OutputExistsError(f"output {out} is a previous merge, but {foreign[0]} was added to it since "
                                f"({len(foreign)} such files); move them out or choose a new directory")
    return "owned"


class StagedOutput:
    """``OUT`` being written: ``path`` is where the output goes, ``scratch`` is for temporary inputs.

    ``commit()`` renames ``path`` into place atomically; ``abort()`` removes everything this object made
    (the work directory, the lock, the parent directories it created). Usable as a context manager.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
        self.out = check_output(out, overwrite=overwrite, inputs=inputs)
        self.overwrite, self.inputs = overwrite, inputs
        self._created = _make_parents(self.out.parent)
        self._lock = None
        self.work = None
        try:
            self._lock = _acquire_lock(self.out)
            remove_stale_work(self.out)
            self.out = check_output(self.out, overwrite=overwrite, inputs=inputs)  # again, now under the lock
            self._was = _state(self.out)
            self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            (self.work / "staging.json").write_text(json.dumps({"format": STAGING_FORMAT, "version": VERSION,
                                                                "pid": os.getpid(), "out": self.out.name}))
            self.path = self.work / "out"
            self.scratch = self.work / "scratch"
            self.path.mkdir()  # follows the umask, like any directory the user makes
            self.scratch.mkdir()
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            self.abort()

    def commit(self) -> Path:
        """Make ``path`` the output: fails, never replaces, if ``OUT`` changed since it was checked."""
        try:
            write_marker(self.path)
            if self._was == "absent":
                if not _rename(self.path, self.out, RENAME_NOREPLACE):
                    raise OutputExistsError(f"output {self.out} appeared while the merge ran; it was left as it is "
                                            "and the merge was not written, choose a new directory")
            else:  # empty, or a previous output of ours (checked again): swap, then delete what was swapped out
                _state_or_refuse(self.out, self.overwrite)
                _rename(self.path, self.out, RENAME_EXCHANGE)
                _remove_previous(self.path, self.out)
        except BaseException:
            self.abort()
            raise
        self._created = []
        self.abort()  # the work directory (scratch, swapped-out old output) and the lock
        return self.out

    def abort(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
        if self._lock is not None:
            _release_lock(self.out, self._lock)
            self._lock = None
        for d in self._created:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []


def remove_stale_work(out: Path) -> None:
    """Remove work directories of earlier runs to ``out`` (their owner is dead: we hold the lock)."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            info = json.loads((d / "staging.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("format") == STAGING_FORMAT and info.get("out") == out.name:
            shutil.rmtree(d, ignore_errors=True)


def _state_or_refuse(out: Path, overwrite: bool) -> str:
    state = _state(out)
    if state == "absent" or (state == "owned" and not overwrite):
        raise OutputExistsError(f"output {out} changed while the merge ran; it was left as it is and the merge "
                                "was not written")
    return state


def _remove_previous(old: Path, out: Path) -> None:
    """Delete the swapped-out previous output, file by file as its marker lists them."""
    owned = owned_files(old)
    if owned is None:  # it was empty
        return
    for f in owned:
        try:
            (old / f).unlink()
        except FileNotFoundError:
            pass
    for dirpath, _, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    if old.exists():  # someone added a file between the check and the swap: keep it, beside OUT
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.previous-", dir=out.parent))
        os.replace(old, kept / out.name)


# -- the rename that fails instead of replacing ------------------------------------------------------------
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _rename(src: Path, dst: Path, flag: int) -> bool:
    """renameat2(src, dst, flag). NOREPLACE: False if ``dst`` exists. EXCHANGE: swaps the two (both must exist)."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flag) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST and flag == RENAME_NOREPLACE:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    return _rename_portable(src, dst, flag)


def _rename_portable(src: Path, dst: Path, flag: int) -> bool:
    """Where renameat2 is missing: claim ``dst`` with mkdir (atomic), then rename onto that empty directory
    (POSIX fails with ENOTEMPTY rather than replace a directory someone filled meanwhile)."""
    if flag == RENAME_EXCHANGE:
        aside = src.with_name(src.name + ".previous")
        os.rename(dst, aside)
        if not _rename_portable(src, dst, RENAME_NOREPLACE):
            os.rename(aside, dst)
            raise OutputExistsError(f"output {dst} appeared while the merge ran; the merge was not written")
        os.rename(aside, src)
        return True
    try:
        os.mkdir(dst)
    except FileExistsError:
        return False
    try:
        os.rename(src, dst)
    except OSError:
        try:
            os.rmdir(dst)
        except OSError:
            pass
        return False
    return True


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


# -- the lock beside OUT -----------------------------------------------------------------------------------
def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _acquire_lock(out: Path) -> int:
    """An exclusive flock on ``.OUT.lock`` (created if missing); refuses at once if another merge holds it."""
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(f"another merge is writing {out} right now; wait for it or choose another "
                                    "directory")
        try:  # the holder before us may have unlinked the file after we opened it: then lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release_lock(out: Path, fd: int) -> None:
    try:
        os.unlink(_lock_path(out))
    except FileNotFoundError:
        pass
    os.close(fd)


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p ``parent``; returns the directories it created, deepest first (to remove them on failure)."""
    missing = []
    p = parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):  # shallowest first
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            for made in reversed(created):
                made.rmdir()
            raise OutputError(f"cannot create {d}: {e.strerror}") from e
        created.append(d)
    return created[::-1]
