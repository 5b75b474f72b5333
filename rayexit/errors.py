"""The one exception type users see: a message that says what was wrong and what was expected."""


class RayexitError(Exception):
    """A problem with the user's input (file, field, setting), reported without a traceback."""
