"""The host side: CLI, demo, MQTT client, OTA serving and deployment, fleet database, model
registry and controller.

Nothing in the light core of ``edgekit`` (artifact, manifest, signing, data, metrics,
runtimes, protocol) imports this package; the import contract in ``pyproject.toml`` keeps it
so. The subpackages need the ``host`` extra (paho-mqtt, SQLAlchemy, psycopg); this module
itself imports nothing, so ``edgekit`` commands that need no database start quickly.

- :mod:`edgekit.host.cli`: the ``edgekit`` command.
- :mod:`edgekit.host.db`: the fleet database (:class:`~edgekit.host.db.Store`).
- :mod:`edgekit.host.registry`: the model registry.
- :mod:`edgekit.host.mqtt_client`: one MQTT connection shared by host parts.
- :mod:`edgekit.host.ota`: serving packages over MQTT and HTTP, deploying and tracking.
- :mod:`edgekit.host.controller`: ingest, rollouts and the maintenance policy.
- :mod:`edgekit.host.demo`: ``edgekit demo``.
"""
