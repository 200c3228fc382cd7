"""``python -m relex``: the library is not the command. The command is ``relex`` (installed with the package), or
``python -m relex_cli``; this says so in one line rather than Python's "cannot be directly executed"."""

import sys

sys.stderr.write("relex: error: the command is `relex ...` (or `python -m relex_cli ...`); `python -m relex` runs "
                 "nothing\n")
sys.exit(2)
