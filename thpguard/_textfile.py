"""Writing a metrics textfile safely: :func:`write_textfile` (re-exported by
:mod:`thpguard.metrics`, where it is documented)."""

from __future__ import annotations

import errno
import os
import secrets
import stat

from thpguard.errors import InvalidArgumentError, ThpguardError

__all__ = ["TextfileError", "UnsafeDirectoryError", "write_textfile"]


class TextfileError(ThpguardError, OSError):
    """:func:`write_textfile` could not write its file; the message names
    the path and the reason. ``errno`` is set when a system call failed."""


class UnsafeDirectoryError(TextfileError):
    """The textfile's directory may be changed by another user (writable by
    group or others without the sticky bit, or owned by another user)."""


_MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP beyond)


def _open_error(path: str, directory: str, exc: OSError) -> TextfileError:
    why = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a directory",
           errno.EACCES: "may not be opened by this user",
           errno.ELOOP: "has too many symbolic links"}.get(exc.errno, exc.strerror)
    return TextfileError(exc.errno, f"cannot write metrics to {path}: the directory {directory} {why}")


def _unsafe(path: str, where: str, why: str) -> UnsafeDirectoryError:
    return UnsafeDirectoryError(
        errno.EPERM,
        f"not writing metrics to {path}: {where} {why}, so another user could redirect the "
        "file while it is written; use a path whose directories only this user (or root) can "
        "change, set the sticky bit (chmod +t) on a shared one, or allow it explicitly "
        "(allow_unsafe_dir=True, thpguard status --allow-unsafe-dir)")


def _check_directory(path: str, where: str, st: os.stat_result) -> None:
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
    if others_write:
        raise _unsafe(path, f"the directory {where}", f"is writable by other users (mode "
                      f"{stat.S_IMODE(st.st_mode):04o}) and has no sticky bit")
    if st.st_uid not in (0, os.geteuid()):
        raise _unsafe(path, f"the directory {where}", f"belongs to another user (uid {st.st_uid})")


def _open_directory(path: str, directory: str, allow_unsafe_dir: bool) -> int:
    """A descriptor of ``directory``, opened one component at a time from
    ``/`` without following a symlink the kernel would resolve on its own:
    every directory on the way is checked (a symlink or directory swapped in
    anywhere along the path by another user would redirect the write, not
    only one in the last directory), and a symlink is followed only when
    its owner is root or this user (in a sticky directory, the only ones
    who can replace it)."""
    if allow_unsafe_dir:
        try:
            return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(path, directory, exc) from None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    todo = [c for c in directory.split("/") if c]
    dfd = os.open("/", flags)
    where, links = "/", 0
    try:
        _check_directory(path, where, os.fstat(dfd))
        while todo:
            name = todo.pop(0)
            if name == ".":
                continue
            if name == "..":
                # Resolved from the real parent of what was opened, as the kernel does.
                where = os.path.dirname(where.rstrip("/")) or "/"
                todo = [c for c in where.split("/") if c] + todo
                os.close(dfd)
                dfd = os.open("/", flags)
                where = "/"
                continue
            here = os.path.join(where, name)
            try:
                child = os.open(name, flags, dir_fd=dfd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise _open_error(path, here, exc) from None
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    raise _open_error(path, here, exc) from None
                if not stat.S_ISLNK(st.st_mode):
                    raise _open_error(path, here, exc) from None
                if st.st_uid not in (0, os.geteuid()):
                    raise _unsafe(path, f"{here}", f"is a symbolic link that belongs to another "
                                  f"user (uid {st.st_uid})") from None
                links += 1
                if links > _MAX_SYMLINKS:
                    raise _open_error(path, directory, OSError(errno.ELOOP, "")) from None
                target = os.readlink(name, dir_fd=dfd)
                rest = [c for c in target.split("/") if c]
                if target.startswith("/"):
                    os.close(dfd)
                    dfd = os.open("/", flags)
                    where = "/"
                todo = rest + todo
                continue
            os.close(dfd)
            dfd, where = child, here
            _check_directory(path, where, os.fstat(dfd))
        return dfd
    except BaseException:
        os.close(dfd)
        raise


def write_textfile(path: str, text: str, *, allow_unsafe_dir: bool = False,
                   mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then rename).

    node_exporter's textfile collector reads ``*.prom`` files in its
    directory; a rename never exposes a half-written file. The file gets
    ``mode`` (read/write bits only, at most 0666; default 0644, whatever the
    umask) through its descriptor:
    nothing is done to a path after the file is created, so a symlink
    planted by another user changes no other file. The temporary file is
    created with ``O_EXCL | O_NOFOLLOW`` relative to the directory opened
    once.

    Raises :class:`UnsafeDirectoryError` unless ``allow_unsafe_dir`` when
    another user could redirect the write: a directory anywhere on the path
    (not only the last one) that is group/world-writable without the sticky
    bit or owned by another user, or a symbolic link on the path that
    belongs to another user. The path is opened one directory at a time
    from ``/`` with ``O_NOFOLLOW``, so what is checked is what is written
    into, and ``..`` goes up from where the symlinks before it led, as the
    kernel resolves it. :class:`TextfileError` when the directory is missing
    or not writable, or the path is not a string or holds a NUL.
    """
    if not isinstance(path, str) or "\0" in path:
        raise TextfileError(errno.EINVAL, f"cannot write metrics to {path!r}: the path must be a "
                            "string without NUL characters")
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o666:
        raise InvalidArgumentError(f"mode must be read/write permission bits (at most 0o666), got {mode!r}")
    # Not os.path.abspath: it would resolve ".." by the text, before the
    # symlinks on the path, where the kernel resolves it after them.
    directory, name = os.path.split(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    if name in ("", ".", ".."):
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
