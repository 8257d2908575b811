"""Writing a metrics textfile safely: :func:`write_textfile` (re-exported by
:mod:`thpguard.metrics`, where it is documented)."""

from __future__ import annotations

import errno
import os
import secrets
import stat

from thpguard.errors import ThpguardError

__all__ = ["TextfileError", "UnsafeDirectoryError", "write_textfile"]


class TextfileError(ThpguardError, OSError):
    """:func:`write_textfile` could not write its file; the message names
    the path and the reason. ``errno`` is set when a system call failed."""


class UnsafeDirectoryError(TextfileError):
    """The textfile's directory may be changed by another user (writable by
    group or others without the sticky bit, or owned by another user)."""


def _open_directory(path: str, directory: str, allow_unsafe_dir: bool) -> int:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        why = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a directory",
               errno.EACCES: "may not be opened by this user"}.get(exc.errno, exc.strerror)
        raise TextfileError(exc.errno, f"cannot write metrics to {path}: the directory {directory} "
                                       f"{why}") from None
    st = os.fstat(dfd)
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
    foreign = st.st_uid not in (0, os.geteuid())
    if (others_write or foreign) and not allow_unsafe_dir:
        os.close(dfd)
        why = (f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}) and has no sticky bit"
               if others_write else f"belongs to another user (uid {st.st_uid})")
        raise UnsafeDirectoryError(
            errno.EPERM,
            f"not writing metrics into {directory}: the directory {why}, so another user could "
            "replace the file while it is written; use a directory only this user can write, "
            "set the sticky bit (chmod +t), or allow it explicitly (allow_unsafe_dir=True, "
            "thpguard status --allow-unsafe-dir)")
    return dfd


def write_textfile(path: str, text: str, *, allow_unsafe_dir: bool = False,
                   mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then rename).

    node_exporter's textfile collector reads ``*.prom`` files in its
    directory; a rename never exposes a half-written file. The file gets
    ``mode`` (default 0644, whatever the umask) through its descriptor:
    nothing is done to a path after the file is created, so a symlink
    planted by another user changes no other file. The temporary file is
    created with ``O_EXCL | O_NOFOLLOW`` relative to the directory opened
    once.

    Raises :class:`UnsafeDirectoryError` for a directory another user may
    change (group/world-writable without the sticky bit, or owned by another
    user) unless ``allow_unsafe_dir``, and :class:`TextfileError` when the
    directory is missing or not writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if not name:
        raise TextfileError(errno.EISDIR, f"cannot write metrics to {path!r}: it names a directory")
    dfd = _open_directory(path, directory, allow_unsafe_dir)
    tmp = f".thpguard-{secrets.token_hex(8)}.tmp"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
        except OSError as exc:
            raise TextfileError(exc.errno, f"cannot write metrics to {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), mode)
                f.write(text)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            if isinstance(exc, OSError) and not isinstance(exc, TextfileError):
                raise TextfileError(exc.errno, f"cannot write metrics to {path}: {exc.strerror}") from None
            raise
    finally:
        os.close(dfd)
