"""Database and package fixtures for the host tests.

``db_url`` runs each test twice: on a SQLite file and on a fresh PostgreSQL database created
on the server at 127.0.0.1:5432 (dropped afterwards). When that server does not answer, the
PostgreSQL runs are skipped with the reason shown, unless EDGEKIT_REQUIRE_POSTGRES=1 (CI),
where they fail.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PG_HOST = "127.0.0.1"
PG_PORT = 5432
_PG_USERS = ("postgres", "root")


def _pg_admin() -> tuple[Any, str]:
    """A connection to the maintenance database, or None and why there is none."""
    import psycopg

    problems = []
    for user in _PG_USERS:
        try:
            conn = psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres",
                                   connect_timeout=3, autocommit=True)
            return conn, user
        except psycopg.OperationalError as exc:
            problems.append(f"as {user}: {str(exc).strip().splitlines()[0]}")
    return None, "; ".join(problems)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'edgekit.db'}"
        return
    from psycopg import sql

    conn, user = _pg_admin()
    if conn is None:
        reason = f"PostgreSQL at {PG_HOST}:{PG_PORT} did not answer ({user})"
        if os.environ.get("EDGEKIT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; EDGEKIT_REQUIRE_POSTGRES=1 makes PostgreSQL tests mandatory")
        pytest.skip(reason)
    name = f"edgekit_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin, _ = _pg_admin()
        if admin is not None:
            with admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                              .format(sql.Identifier(name)))


@pytest.fixture
def store(db_url: str) -> Iterator[Any]:
    from edgekit.host.db import Store

    st = Store(db_url)
    yield st
    st.close()


@pytest.fixture
def t0() -> dt.datetime:
    """A fixed point in time, so lease and filter tests never depend on the clock."""
    return dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(3).astype(np.float32))


def build_package(path: Path, *, name: str = "tiny", version: str = "1.0.0", seed: int = 0,
                  accuracy: float = 0.9, sign_key: Any = None) -> Path:
    """A real, tiny classifier package: probs = softmax(x @ W + b), x float32 [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.artifact import write_package
    from edgekit.manifest import Manifest, TensorSpec

    weights, bias = _weights(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    manifest = Manifest(
        name=name, version=version, created="2026-05-01T12:00:00+00:00",
        task="classification",
        source={"framework": "onnx", "reference": "tests/host fixture", "sha256": "0" * 64},
        target={"format": "onnx", "model_file": "model.onnx", "runtime": "onnxruntime"},
        inputs=[TensorSpec("x", "float32", ["batch", 4])],
        outputs=[TensorSpec("probs", "float32", ["batch", 3])],
        recipe={"quantize": "none", "opset": 17, "seed": seed},
        tools={"onnx": onnx.__version__},
        metrics={
            "accuracy": {"samples": 120, "artifact": {"accuracy": accuracy, "f1": accuracy - 0.05}},
            "latency": {"artifact": {"p50_ms": 0.05, "p95_ms": 0.08}},
            "parity": {"passed": True},
        },
        labels=["a", "b", "c"],
    )
    write_package(path, manifest, {"model.onnx": model.SerializeToString()}, sign_key=sign_key)
    return path


@pytest.fixture(scope="session")
def make_package() -> Callable[..., Path]:
    return build_package
