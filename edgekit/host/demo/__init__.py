"""The one-command demo of the whole loop (``edgekit demo``)."""
