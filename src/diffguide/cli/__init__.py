"""The ``diffguide`` command line (typer).

:mod:`.main` builds the app and registers one module per command; see ``main.py`` for how to
add a command. Shared option parsing lives in :mod:`.common`.
"""
