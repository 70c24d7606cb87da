"""The edgekit device agent: serve a model on a Raspberry Pi or a Jetson, report over MQTT.

It depends on edgekit's light core (artifact, manifest, metrics, runtimes, protocol) and one
inference runtime, never on torch, tensorflow, onnx or scikit-learn.

Embedding it::

    from device_agent import Agent, load_config

    agent = Agent(load_config(overrides={"model.package": "digits.edgepkg",
                                         "model.dir": "models",
                                         "model.trusted_keys": ["signing.pub"]}))
    prediction = agent.predict({"x": batch})
    agent.feedback(prediction.id, label=3)

The model in service is held by :class:`ModelSlot` (on disk and in memory; every switch
goes through it); the model folder by :class:`ModelStore`; :func:`load_model` verifies and
loads a package. OTA updates build on these three.
"""

from __future__ import annotations

from edgekit import __version__

from ._agent import Agent
from ._model import LoadedModel, Prediction, TrustPolicy, load_model
from ._predict import Observer, Served
from ._slot import ModelSlot
from ._store import ActiveRecord, ModelStore, StoredPackage
from .config import AgentConfig, load_config
from .errors import RequestError

__all__ = [
    "ActiveRecord",
    "Agent",
    "AgentConfig",
    "LoadedModel",
    "ModelSlot",
    "ModelStore",
    "Observer",
    "Prediction",
    "RequestError",
    "Served",
    "StoredPackage",
    "TrustPolicy",
    "__version__",
    "load_config",
    "load_model",
]
