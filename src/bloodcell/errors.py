"""The one error type the CLI turns into a single clear line and a non-zero exit."""


class BloodcellError(Exception):
    """A user-facing problem: bad input, bad config, unusable data. Message is one line."""


class DataError(BloodcellError):
    """The data given cannot be used (missing path, no images, one class only...)."""


class ConfigError(BloodcellError):
    """A configuration key or value is wrong."""
