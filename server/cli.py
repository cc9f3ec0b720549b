"""The ``kvserve`` command: ``kvserve generate ...`` (``kvserve serve`` comes with the server)."""
from __future__ import annotations

import sys

USAGE = "usage: kvserve generate PROMPT [PROMPT ...] [options]   (kvserve generate -h for options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from engine.generate import main as generate_main
        return generate_main(rest)
    print(f"kvserve: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
