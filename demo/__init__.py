"""make demo: the whole pipeline offline on CPU (see demo/__main__.py)."""
