"""data_tools: image sources -> colour palette -> pre-tokenized pixel shards, and their inspection.

Commands: `python -m data_tools.build_shards SOURCE --out DIR` and
`python -m data_tools.inspect_shards DIR --out grid.png` (see those modules).
"""


class UserError(Exception):
    """A problem the user can fix (bad path, option or input); the CLIs print it and exit 2."""
