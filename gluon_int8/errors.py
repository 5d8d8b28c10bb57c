"""Error messages: the line of an exception, MXNet's included, that says what went wrong."""


def first_line(err: Exception) -> str:
    """The first line of ``err`` that says something.

    MXNet's messages often start with ``Traceback (most recent call last):`` and a
    ``File "../src/...", line N`` line before the real one (``MXNetError: Check failed:
    ...``); quoting only the first line gave users "(Traceback (most recent call last):)".
    """
    for line in str(err).strip().splitlines():
        line = line.strip()
        if line and not line.startswith(('Traceback (most recent call last)', 'File "')):
            return line[len('MXNetError: '):] if line.startswith('MXNetError: ') else line
    return type(err).__name__
