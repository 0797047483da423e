"""The one exception type users see: bad input, said in one line."""


class AECompressError(ValueError):
    """A problem with what the user asked for, phrased for a person.

    The CLI prints these as a single ``aecompress: error: ...`` line and exits
    non-zero, so the message must name the bad value and what would be valid.
    """
