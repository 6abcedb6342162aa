"""The one base class of errors a user can act on.

Entry points print these as one line naming the file or key, and exit with status 2.
Anything else is a bug and keeps its traceback.
"""


class RagtuneError(Exception):
    """Bad input, a bad config, a missing model, a mismatching index: the user can fix it."""
