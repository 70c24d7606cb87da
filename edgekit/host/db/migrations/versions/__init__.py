"""One module per schema revision, in order: ``NNNN_what.py``."""
