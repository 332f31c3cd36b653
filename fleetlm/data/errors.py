"""The error type of the data pipeline."""


class DataError(ValueError):
    """Invalid data, data files or data settings; the message names the value and the fix."""
