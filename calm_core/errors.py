"""User-facing errors: each message names the problem and what to do about it.

Jobs catch ``CalmError`` at the top and print ``error: <message>`` (one line, exit code 2)
instead of a traceback.
"""


class CalmError(Exception):
    """A problem with the user's input (config, path, corpus, checkpoint), not a bug."""


class ConfigError(CalmError):
    pass


class DataError(CalmError):
    pass


class ArtifactError(CalmError):
    pass
