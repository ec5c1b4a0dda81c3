"""The error a caller's own options cause, apart from the compiler's internal failures.

The command line maps each kind of error to its exit status (tools/cli.py): OptionsError 2,
FrontendError 3 (the model), CalibrationError 4 (the data), OutputError 5 (the output path);
anything else is an internal error, 1.
"""


class OptionsError(ValueError):
    """An option or argument is not valid: an unknown name, a value out of range, a node the
    model does not have."""
