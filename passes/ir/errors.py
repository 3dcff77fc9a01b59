"""The one exception type the pipeline raises for bad input.

Every message names what is wrong: the file, the node, the tensor or the input.
The CLI prints it on one line and exits non-zero.
"""


class SmoothQuantError(Exception):
    """A user-facing error: bad model, bad calibration data, bad option."""
