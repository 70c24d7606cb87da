"""The digits CNN in PyTorch and Keras (defined in edgekit.host.demo.digits, shared with the demo).

``examples.digits.models:torch_cnn`` works as a ``package.module:factory`` source.
"""

from edgekit.host.demo.digits import keras_cnn, torch_cnn, train_keras, train_torch

__all__ = ["keras_cnn", "torch_cnn", "train_keras", "train_torch"]
