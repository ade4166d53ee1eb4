"""The data pipeline's user-facing error type."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file and what to do."""
