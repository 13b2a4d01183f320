"""The one exception type the pack raises for problems a user can fix."""


class WanDistriFusionError(ValueError):
    """A problem with input, settings, files or workers, with a message that says what to change."""
