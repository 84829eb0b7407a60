"""The one error type a user sees for a bad setting."""


class ConfigError(ValueError):
    """A setting is invalid. The message names the key, the bad value, what is allowed and the fix.

    Raised before any data or model is loaded, so nothing already written is touched.
    """
