"""edgekit: take a trained model to a fleet of edge devices and keep it good there.

This package is the light core that the host and the device share (artifact format,
manifest, metrics, data files, runtimes, errors) plus the host-side CLI. Importing it
never imports torch or tensorflow.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgekit.artifact import Package, open_package, verify_package, write_package
from edgekit.data import Dataset, load_npz, save_npz
from edgekit.errors import EdgekitError
from edgekit.manifest import Manifest, TensorSpec

__all__ = [
    "Dataset",
    "EdgekitError",
    "Manifest",
    "Package",
    "TensorSpec",
    "__version__",
    "load_npz",
    "open_package",
    "save_npz",
    "verify_package",
    "write_package",
]
