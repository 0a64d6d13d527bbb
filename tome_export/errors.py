"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do."""


class ValidationError(Exception):
    """A built artifact does not compute what PyTorch computes (beyond the recipe's threshold)."""


EXIT_CHECK_FAILED = 1  # a built artifact or a checked file does not verify
EXIT_USER_ERROR = 2  # bad input, a missing prerequisite, or the operating system refused (space, permission)

# What to do about the operating-system errors a user can fix, by errno name.
_OS_HINTS = {
    "ENOSPC": "free some space or write elsewhere",
    "EDQUOT": "free some space or write elsewhere",
    "EFBIG": "the file system or a size limit (ulimit -f) refused the file: write elsewhere or lift the limit",
    "EACCES": "choose a place you may write to",
    "EPERM": "choose a place you may write to",
    "EROFS": "choose a writable place",
    "ENAMETOOLONG": "choose a shorter name",
    "ENOENT": "check the path",
    "ENOTDIR": "check the path",
    "EISDIR": "pass a file, not a directory",
    "EMFILE": "raise the open-file limit (ulimit -n)",
}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}{where}: {_OS_HINTS.get(name, 'check the path and the disk')}"
