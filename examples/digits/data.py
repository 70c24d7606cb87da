"""The digits data helpers (they live in edgekit.host.demo.digits, shared with the demo)."""

from edgekit.host.demo.digits import drift, load_digits_split, to_channels_last, write_npz_files

__all__ = ["drift", "load_digits_split", "to_channels_last", "write_npz_files"]
