"""The controller's database on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, text, update

from edgekit.data import load_npz, save_npz
from edgekit.errors import ArtifactError, ConfigError, DataError, UsageError
from edgekit.host.db import (
    SCHEMA_VERSION,
    MetricsSummary,
    ModelRecord,
    RolloutState,
    SampleIn,
    Store,
    TargetState,
)
from edgekit.host.db._schema import SchemaInfo
from edgekit.host.errors import LeaseLostError
from edgekit.manifest import TensorSpec


def test_schema_created_once_and_newer_schema_refused(db_url: str) -> None:
    first = Store(db_url)
    second = Store(db_url)  # opening an existing database creates nothing twice
    with second.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(SchemaInfo)).scalar_one() == 1
    assert second.schema_version() == SCHEMA_VERSION
    with first.engine.begin() as conn:
        conn.execute(update(SchemaInfo).values(version=SCHEMA_VERSION + 1))
    first.close()
    second.close()
    with pytest.raises(ConfigError, match="newer than this edgekit"):
        Store(db_url)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'sub' / 'edgekit.db'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.close()


def test_unsupported_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        Store("mysql://user@localhost/db")


def test_late_death_of_an_old_session_is_ignored(store: Store, t0: dt.datetime) -> None:
    assert store.upsert_device_status("f1", "d1", online=True, session=1, agent_version="0.1",
                                      model_name="digits", model_version="1.0.0",
                                      status={"state": "serving"}, seen_at=t0)
    assert store.upsert_device_status("f1", "d1", online=True, session=2,
                                      seen_at=t0 + dt.timedelta(seconds=5))
    # The broker delivers session 1's last will after session 2's birth.
    assert not store.upsert_device_status("f1", "d1", online=False, session=1)
    device = store.get_device("f1", "d1")
    assert device is not None and device.online and device.session == 2
    # Fields not given keep their value.
    assert (device.model_version, device.agent_version) == ("1.0.0", "0.1")
    assert device.status == {"state": "serving"}
    assert device.last_seen == t0 + dt.timedelta(seconds=5)
    assert store.upsert_device_status("f1", "d1", online=False, session=2)
    device = store.get_device("f1", "d1")
    assert device is not None and not device.online
    assert device.last_seen == t0 + dt.timedelta(seconds=5)
    store.upsert_device_status("f2", "d9", online=True, session=0)
    assert [d.device for d in store.list_devices("f1")] == ["d1"]
    assert [(d.fleet, d.device) for d in store.list_devices(online=True)] == [("f2", "d9")]
    assert store.list_fleets() == ["f1", "f2"]


def test_duplicate_metrics_are_dropped(store: Store, t0: dt.datetime) -> None:
    base = {"session": 3, "ts": t0}
    assert store.record_metrics("f", "d1", seq=1, payload={"n": 1}, **base,
                                summary=MetricsSummary(accuracy=0.9, label_count=10))
    # At-least-once delivery: the same message again, even with another body, is dropped.
    assert not store.record_metrics("f", "d1", seq=1, payload={"n": 999}, **base)
    # The same seq from a new session is a new message.
    assert store.record_metrics("f", "d1", session=4, seq=1, payload={"n": 2}, ts=t0)
    history = store.metrics_history("f", device="d1")
    assert [(m.session, m.seq, m.payload["n"]) for m in history] == [(3, 1, 1), (4, 1, 2)]
    # Messages arriving out of order: the older summary never replaces the newer one.
    assert store.record_metrics("f", "d1", session=4, seq=5, payload={}, ts=t0,
                                summary=MetricsSummary(accuracy=0.8, f1=0.7, latency_p50_ms=2.5,
                                                       label_count=40))
    assert store.record_metrics("f", "d1", session=4, seq=4, payload={}, ts=t0,
                                summary=MetricsSummary(accuracy=0.1, label_count=1))
    device = store.get_device("f", "d1")
    assert device is not None
    assert device.metrics == MetricsSummary(accuracy=0.8, f1=0.7, latency_p50_ms=2.5,
                                            label_count=40)
    # Metrics before any status create the device, offline until its status says otherwise.
    assert not device.online and device.last_seen is not None
    assert len(store.metrics_history("f")) == 4
    assert store.metrics_history("f", since=t0 + dt.timedelta(seconds=1)) == []


def test_events_follow_by_id_cursor(store: Store, t0: dt.datetime) -> None:
    ids = [store.record_event("f", "rollout_started", "wave 0", rollout_id=None,
                              ts=t0 + dt.timedelta(seconds=i)) for i in range(3)]
    other = store.record_event("g", "policy_fired", "accuracy 0.61 < 0.80", device="d2",
                               reason="accuracy_drop", data={"accuracy": 0.61}, ts=t0)
    assert ids == sorted(ids) and other > ids[-1]
    assert [e.id for e in store.list_events(fleet="f")] == ids
    assert [e.id for e in store.list_events(after_id=ids[1])] == [ids[2], other]
    assert [e.id for e in store.list_events(since=t0 + dt.timedelta(seconds=1))] == ids[1:]
    assert [e.id for e in store.list_events(limit=2, latest=True)] == [ids[2], other]
    (event,) = store.list_events(kinds=["policy_fired"])
    assert (event.device, event.reason, event.data) == ("d2", "accuracy_drop", {"accuracy": 0.61})
    assert store.list_events(after_id=other) == []
    new = store.record_event("f", "rollout_succeeded")
    assert [e.id for e in store.list_events(after_id=other)] == [new]
    # A device's event delivered twice (QoS 1) is kept once; another device's seq 7 is new.
    dev = store.record_event("f", "rolled_back", "NaN outputs", device="d1", seq=7,
                             level="error", reason="non_finite")
    assert dev is not None
    assert store.record_event("f", "rolled_back", "NaN outputs", device="d1", seq=7) is None
    assert store.record_event("f", "rolled_back", device="d2", seq=7) is not None
    assert [(e.device, e.seq, e.level) for e in store.list_events(after_id=new)] == [
        ("d1", 7, "error"), ("d2", 7, "info")]
    with pytest.raises(UsageError, match="rollout 424242 not found"):
        store.record_event("f", "wave_started", rollout_id=424242)


def _sample(i: int, label: int | None, ts: dt.datetime) -> SampleIn:
    return SampleIn(prediction_id=f"p{i}", label=label, prediction=(label or 0) + 1,
                    model_name="digits", model_version="1.0.0", ts=ts,
                    inputs={"pixels": np.full((8, 8), i, dtype=np.float32),
                            "meta": np.array([i, i + 1, i + 2], dtype=np.int64)})


def test_sample_export_round_trip(store: Store, t0: dt.datetime, tmp_path: Path) -> None:
    at = [t0 + dt.timedelta(minutes=i) for i in range(6)]
    assert store.add_samples("f", "d1", [_sample(0, 3, at[0]), _sample(1, 7, at[2]),
                                         _sample(2, None, at[3])]) == 3
    assert store.add_samples("f", "d2", [_sample(3, np.int64(5), at[1]),
                                         _sample(4, 1, at[4])]) == 2
    assert store.add_samples("g", "d1", [_sample(5, 9, at[5])]) == 1
    # Delivered twice: dropped.
    assert store.add_samples("f", "d1", [_sample(0, 3, at[0])]) == 0
    # The label of p2 arrives later, as feedback.
    assert store.label_sample("f", "d1", "p2", 4)
    assert not store.label_sample("f", "d1", "nope", 4)
    assert store.count_samples(fleet="f") == 5

    data = store.export_samples(at[1], fleet="f")
    out = tmp_path / "recent.npz"
    assert data.labels is not None
    save_npz(out, data.inputs, data.labels)
    with np.load(out) as npz:
        assert sorted(npz.files) == ["meta", "pixels", "y"]
    # The converter's reader accepts it against the model's input specs.
    loaded = load_npz(out, [TensorSpec("pixels", "float32", ["batch", 8, 8]),
                            TensorSpec("meta", "int64", ["batch", 3])], require_labels=True)
    # In time order: p3 (d2, t1), p1 (d1, t2), p2 (d1, t3), p4 (d2, t4).
    assert loaded.labels is not None and loaded.labels.tolist() == [5, 7, 4, 1]
    assert loaded.inputs["pixels"].shape == (4, 8, 8)
    assert loaded.inputs["meta"].shape == (4, 3)
    assert loaded.inputs["pixels"][:, 0, 0].tolist() == [3, 1, 2, 4]
    assert loaded.inputs["meta"][:, 0].tolist() == [3, 1, 2, 4]

    assert store.export_samples(fleet="f", device="d1").labels.tolist() == [3, 7, 4]  # type: ignore[union-attr]
    assert store.export_samples(fleet="g").labels.tolist() == [9]  # type: ignore[union-attr]
    with pytest.raises(DataError, match="no labelled samples"):
        store.export_samples(t0 + dt.timedelta(hours=1))


def test_batched_prediction_gives_one_sample_per_row(store: Store, t0: dt.datetime) -> None:
    batch = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    rows = [SampleIn("req-1", {"x": batch[i]}, row=i, prediction=i, ts=t0) for i in range(3)]
    assert store.add_samples("f", "d1", rows) == 3
    assert store.add_samples("f", "d1", rows[1:2]) == 0
    assert store.count_samples(labelled=False) == 3 and store.count_samples() == 0
    for i, label in enumerate([2, 0, 1]):
        assert store.label_sample("f", "d1", "req-1", label, row=i)
    data = store.export_samples()
    assert np.array_equal(data.inputs["x"], batch)
    assert data.labels is not None and data.labels.tolist() == [2, 0, 1]


def test_sample_export_refuses_mixed_models(store: Store, t0: dt.datetime) -> None:
    store.add_samples("f", "d1", [_sample(0, 1, t0)])
    odd = SampleIn("other", {"pixels": np.zeros((28, 28), np.float32),
                             "meta": np.zeros(3, np.int64)}, label=2, ts=t0)
    store.add_samples("f", "d1", [odd])
    with pytest.raises(DataError, match=r"sample other \(row 0\) of device d1 has inputs"):
        store.export_samples(fleet="f")
    with pytest.raises(DataError, match="not a numeric array"):
        store.add_samples("f", "d1", [SampleIn("s", {"x": np.array(["a"])}, label=1)])


def _model(version: str, sha: str, t0: dt.datetime) -> ModelRecord:
    return ModelRecord(
        name="digits", version=version, sha256=sha, size=10, format="onnx",
        task="classification", path=f"digits/{version}/model.edgepkg",
        manifest={"name": "digits"}, evaluation={"accuracy": {"artifact": {"accuracy": 0.9}}},
        signed=False, signature_verified=False, key_id=None, parent=None, recipe={},
        data=None, created=t0)


def test_model_rows(store: Store, t0: dt.datetime) -> None:
    for version in ("1.9.0", "1.10.0", "1.2.0"):
        assert store.add_model(_model(version, version * 4, t0))[1] is True
    again, created = store.add_model(_model("1.9.0", "1.9.0" * 4, t0))
    assert not created and again.created == t0
    with pytest.raises(ArtifactError, match="digits:1.9.0 is already registered"):
        store.add_model(_model("1.9.0", "f" * 64, t0))
    assert [m.version for m in store.list_models()] == ["1.2.0", "1.9.0", "1.10.0"]
    assert store.get_model("digits").version == "1.10.0"  # type: ignore[union-attr]
    assert store.get_model("nothing") is None
    store.promote_model("digits", "1.9.0", "stable")
    store.promote_model("digits", "1.10.0", "stable")
    assert store.channel_version("digits", "stable") == "1.10.0"
    assert store.get_model("digits", "1.9.0").channels == []  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="digits:3.0 is not in the registry"):
        store.promote_model("digits", "3.0", "stable")


def test_rollout_state_machine_and_targets(store: Store, t0: dt.datetime) -> None:
    plan = {"canary": 1, "wave_factor": 2.0, "abort": {"max_failure_rate": 0.2}}
    r = store.create_rollout("f", "digits", "1.1.0", plan, targets=["d1", "d2", "d3"], now=t0)
    assert (r.state, r.plan, r.current_wave, r.owner) == ("pending", plan, 0, None)
    with pytest.raises(UsageError, match=f"already has an active rollout \\({r.id}\\)"):
        store.create_rollout("f", "digits", "1.2.0", {})
    assert store.create_rollout("g", "digits", "1.1.0", {}).fleet == "g"
    with pytest.raises(UsageError, match="pending; it cannot become succeeded"):
        store.transition_rollout(r.id, RolloutState.SUCCEEDED)
    with pytest.raises(UsageError, match="unknown rollout state"):
        store.transition_rollout(r.id, "exploded")
    for state in ("running", "paused", "running", "running", "aborting"):
        assert store.transition_rollout(r.id, state, reason=f"to {state}").state == state
    assert store.set_rollout_wave(r.id, 1).current_wave == 1

    target = store.set_target_state(r.id, "d1", TargetState.ASSIGNED, wave=1,
                                    previous_version="1.0.0", now=t0)
    assert (target.state, target.wave, target.assigned_at) == ("assigned", 1, t0)
    target = store.set_target_state(r.id, "d1", "succeeded", now=t0 + dt.timedelta(seconds=9))
    # Unset fields keep their value.
    assert (target.previous_version, target.assigned_at, target.wave) == ("1.0.0", t0, 1)
    store.set_target_state(r.id, "d4", "skipped", reason="joined late")
    assert [t.device for t in store.list_rollout_targets(r.id)] == ["d1", "d2", "d3", "d4"]
    assert [t.device for t in store.list_rollout_targets(r.id, state="pending")] == ["d2", "d3"]

    done = store.transition_rollout(r.id, "aborted", reason="canary accuracy 0.55 < 0.90")
    assert (done.state, done.reason, done.owner) == ("aborted", "canary accuracy 0.55 < 0.90", None)
    assert done.finished is not None
    with pytest.raises(UsageError, match="has finished"):
        store.transition_rollout(r.id, "running")
    with pytest.raises(UsageError, match="has finished"):
        store.set_rollout_wave(r.id, 2)
    # The fleet is free again.
    assert store.create_rollout("f", "digits", "1.2.0", {}).state == "pending"
    assert [x.id for x in store.list_rollouts(fleet="f", active=False)] == [r.id]
    with pytest.raises(UsageError, match="rollout 9999 not found"):
        store.get_rollout(9999)


def test_lease_expiry_lets_another_controller_claim(store: Store, t0: dt.datetime) -> None:
    r = store.create_rollout("f", "digits", "2.0.0", {}, now=t0)
    s = dt.timedelta(seconds=1)
    assert store.claim_rollout("A", 30, now=t0).owner == "A"  # type: ignore[union-attr]
    assert store.claim_rollout("B", 30, now=t0 + 10 * s) is None
    assert store.claim_rollout("A", 30, now=t0 + 10 * s) is None  # already held: not re-claimed
    assert [x.id for x in store.owned_rollouts("A", now=t0 + 10 * s)] == [r.id]
    assert store.renew_rollout(r.id, "A", 30, now=t0 + 20 * s)  # now held until t0 + 50 s
    assert store.claim_rollout("B", 30, now=t0 + 40 * s) is None
    store.transition_rollout(r.id, "running", owner="A", now=t0 + 45 * s)
    # A stops renewing (it died, or hangs); once the lease is over, B takes the rollout.
    claimed = store.claim_rollout("B", 30, now=t0 + 51 * s)
    assert claimed is not None and claimed.owner == "B" and claimed.state == "running"
    assert not store.renew_rollout(r.id, "A", 30, now=t0 + 52 * s)
    with pytest.raises(LeaseLostError, match="holder: B"):
        store.transition_rollout(r.id, "paused", owner="A", now=t0 + 52 * s)
    with pytest.raises(LeaseLostError):
        store.set_target_state(r.id, "d1", "assigned", owner="A", now=t0 + 52 * s)
    assert store.owned_rollouts("A", now=t0 + 52 * s) == []
    assert store.set_target_state(r.id, "d1", "assigned", owner="B", now=t0 + 52 * s).wave is None
    # A lease that ran out is lost to its holder too, even when nobody took it yet.
    with pytest.raises(LeaseLostError):
        store.set_rollout_wave(r.id, 1, owner="B", now=t0 + 90 * s)
    assert store.release_rollout(r.id, "B")
    assert store.claim_rollout("A", 30, now=t0 + 91 * s).owner == "A"  # type: ignore[union-attr]
    # A finished rollout is nobody's.
    store.transition_rollout(r.id, "succeeded", owner="A", now=t0 + 92 * s)
    assert store.claim_rollout("B", 30, now=t0 + 93 * s) is None


def test_named_leases(store: Store, t0: dt.datetime) -> None:
    s = dt.timedelta(seconds=1)
    assert store.acquire_lease("policy:f", "A", 10, now=t0)
    assert not store.acquire_lease("policy:f", "B", 10, now=t0 + 5 * s)
    assert store.acquire_lease("policy:f", "A", 10, now=t0 + 8 * s)  # renewal: to t0 + 18 s
    assert not store.acquire_lease("policy:f", "B", 10, now=t0 + 15 * s)
    assert store.lease_holder("policy:f", now=t0 + 15 * s) == "A"
    assert store.acquire_lease("policy:f", "B", 10, now=t0 + 19 * s)
    assert store.lease_holder("policy:f", now=t0 + 19 * s) == "B"
    assert not store.release_lease("policy:f", "A")
    assert store.release_lease("policy:f", "B")
    assert store.lease_holder("policy:f", now=t0 + 19 * s) is None


def _run_together(workers: list[threading.Thread]) -> None:
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert not w.is_alive()


def test_concurrent_claimers_never_own_the_same_rollout(db_url: str) -> None:
    setup = Store(db_url)
    ids = {setup.create_rollout(f"fleet{i}", "digits", "3.0.0", {}).id for i in range(12)}
    claimers = {name: Store(db_url) for name in ("ctl-a", "ctl-b", "ctl-c")}  # own engines
    won: dict[str, list[int]] = {name: [] for name in claimers}
    errors: list[BaseException] = []
    start = threading.Barrier(len(claimers))

    def claim_all(name: str) -> None:
        try:
            start.wait()
            while (got := claimers[name].claim_rollout(name, 300)) is not None:
                won[name].append(got.id)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    _run_together([threading.Thread(target=claim_all, args=(n,)) for n in claimers])
    assert errors == []
    claimed = [rid for got in won.values() for rid in got]
    assert sorted(claimed) == sorted(ids)  # every rollout claimed exactly once
    for name, got in won.items():
        assert {r.id for r in setup.owned_rollouts(name)} == set(got)
    for st in (setup, *claimers.values()):
        st.close()


def test_concurrent_creates_leave_one_active_rollout_per_fleet(db_url: str) -> None:
    stores = [Store(db_url) for _ in range(3)]
    results: list[str] = []
    start = threading.Barrier(len(stores))

    def create(st: Store, version: str) -> None:
        start.wait()
        try:
            st.create_rollout("f", "digits", version, {})
            results.append("created")
        except UsageError:
            results.append("refused")

    _run_together([threading.Thread(target=create, args=(st, f"4.0.{i}"))
                   for i, st in enumerate(stores)])
    assert sorted(results) == ["created", "refused", "refused"]
    assert len(stores[0].list_rollouts(fleet="f", active=True)) == 1
    for st in stores:
        st.close()


def test_public_names_exist() -> None:
    # edgekit.host itself imports nothing (so commands start fast); the database package
    # is where the public names are.
    import edgekit.host.db as db

    assert sorted(db.__all__) == sorted(set(db.__all__))
    for name in db.__all__:
        assert hasattr(db, name), name
