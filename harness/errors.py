"""Error types that carry their meaning to the CLI and the runner."""


class UserError(Exception):
    """Bad input from the user (config, CLI argument, result file).

    The CLI prints the message as one line and exits with code 2; never a traceback.
    The message must name the culprit (file, key, value).
    """

    exit_code = 2


class ProbeSkip(Exception):
    """A probe cannot run this case on this device; the case ends `skipped` with the reason."""


class ProbeCheckFailed(Exception):
    """A probe's output failed its correctness check; the case ends `failed`."""
