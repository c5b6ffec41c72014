"""`fiqa-gate` and `python -m fiqa_gate`: Ctrl-C while the command line is still loading
ends as quietly as Ctrl-C later (exit 130, no traceback)."""

import sys


def run() -> None:
    try:
        from fiqa_gate.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
