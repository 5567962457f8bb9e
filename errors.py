"""The user errors of `faster`: what a user can fix by changing an argument or a file.

The command line turns these into one line naming the bad value (exit 2 for a bad argument, 1
otherwise, see cli.py); any other exception is a bug and keeps its traceback. All of them are
ValueErrors, so library callers that catch ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, not with faster: the message names the value and what to do."""


class BadValue(UserError):
    """An argument or configuration value is outside what it may be (a bad option, name or number)."""


class BadFile(UserError):
    """A file or directory is missing, unreadable, or not what it should be (a shard, a run, weights)."""


class Incompatible(UserError):
    """Inputs that are each fine but cannot be used together (feature sets of other configurations,
    a run and features of other models, an output directory written with other options)."""


class Diverged(UserError):
    """Training produced a non-finite loss (a learning rate too high, bad inputs): stopped, naming the
    epoch and step, the last good training state kept."""
