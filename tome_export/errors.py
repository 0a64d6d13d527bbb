"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do."""


class ValidationError(Exception):
    """A built artifact does not compute what PyTorch computes (beyond the recipe's threshold)."""
