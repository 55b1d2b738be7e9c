#!/usr/bin/env python3
"""List and validate ktmoe weight files.

    python tools/inspect_weights.py PATH [--json] [--no-verify]

PATH is a weight file or a directory of them.  Prints the layers, method,
format, group size, shapes and bytes of each projection, then checks every
file (structure, and CRC-32 checksums unless --no-verify).  Exits 0 when the
files are fine, 1 with one ``error:`` line per problem otherwise.  The same
command is ``ktmoe inspect``.
"""

import sys

from ktmoe.weight_files import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main(prog="inspect_weights.py"))
