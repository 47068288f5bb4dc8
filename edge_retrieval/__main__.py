"""``python -m edge_retrieval``: the same command line as the ``edge-retrieval`` script."""
from edge_retrieval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
