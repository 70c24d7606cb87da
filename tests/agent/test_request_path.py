"""The request path's parts: the prediction ring, the sample schedule, the finite check, the
statistics fold, and a probation served through the model slot (real models in onnxruntime).
"""

from __future__ import annotations

import bisect
import warnings
from pathlib import Path

import numpy as np
import pytest
from _agent_support import Models

from device_agent import Agent, Served, load_config
from device_agent._inputs import InputValidator, all_finite
from device_agent._model import confidence, probabilities
from device_agent._quality import PredictionLog, SampleGate
from device_agent._stats import LATENCY_BUCKETS_S, RequestStats
from device_agent.errors import RequestError
from edgekit.errors import InputError
from edgekit.manifest import TensorSpec
from edgekit.protocol import ErrorCode
from edgekit.protocol.ota import Probation


def test_prediction_ring_finds_labels_and_forgets_overwritten_entries() -> None:
    log = PredictionLog(4)
    scores = np.eye(3, dtype=np.float32)[[2]]
    for seq in range(1, 7):
        log.add(seq, f"sha-{seq}", scores, None)
    entry = log.claim(log.id_of(6))
    assert entry.model_sha256 == "sha-6" and entry.classes().tolist() == [2]
    with pytest.raises(RequestError) as again:
        log.claim(log.id_of(6))
    assert again.value.code == ErrorCode.ALREADY_LABELLED
    log.release(log.id_of(6))
    assert log.claim(log.id_of(6)).model_sha256 == "sha-6"  # released: it can be labelled
    # 1 and 2 were overwritten by 5 and 6; ids of another agent or malformed ones are unknown.
    for pid in (log.id_of(1), log.id_of(2), log.id_of(7), "abcd1234-3", log.prefix + "03",
                log.prefix + "3x", log.prefix + "+3", log.prefix + "9" * 40, log.prefix):
        with pytest.raises(RequestError) as unknown:
            log.claim(pid)
        assert unknown.value.code == ErrorCode.UNKNOWN_PREDICTION, pid
    assert log.claim(log.id_of(3)).model_sha256 == "sha-3"


def test_sample_schedule_picks_the_configured_fraction() -> None:
    def picks(gate: SampleGate, n: int) -> int:
        count = 0
        for seq in range(1, n + 1):
            if seq >= gate.next_pick:
                gate.picked(seq)
                count += 1
        return count

    assert picks(SampleGate(1.0, 30), 1000) == 1000
    assert picks(SampleGate(0.0, 30), 1000) == 0
    assert picks(SampleGate(0.5, 0), 1000) == 0  # no uploads allowed: nothing is kept
    # Binomial(40000, 0.25): mean 10000, standard deviation 87.
    assert 9400 < picks(SampleGate(0.25, 30), 40000) < 10600


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 32, 100])  # 100 x 64 takes the ufunc path
def test_finite_check_agrees_with_numpy_and_stays_quiet(dtype: type, rows: int) -> None:
    huge = float(np.finfo(dtype).max)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            for value in (0.5, huge, -huge, np.inf, -np.inf, np.nan):
                arr = np.full((rows, 64), 0.25, dtype)
                arr[rows // 2, 7] = value
                assert all_finite(arr) == bool(np.isfinite(arr).all()), value
                assert all_finite(arr[:, ::2]) == bool(np.isfinite(arr[:, ::2]).all()), value


def test_specialised_check_accepts_and_refuses_as_the_full_check() -> None:
    validator = InputValidator([TensorSpec("x", "float32", ["batch", 64])], max_batch=200)
    ran: list[dict[str, np.ndarray]] = []

    def run(feeds: dict[str, np.ndarray]) -> int:
        ran.append(feeds)
        return len(ran)

    answer = validator.answerer(run)
    for rows in (1, 3, 100, 3, 1):  # 100 x 64 takes the ufunc path; sizes seen twice
        good = {"x": np.full((rows, 64), 0.5, np.float32)}
        feeds, result = answer(good)
        assert feeds is good and ran[-1] is good and result == len(ran)
        for value in (np.nan, np.inf, -np.inf):
            bad = {"x": good["x"].copy()}
            bad["x"][rows - 1, 5] = value
            with pytest.raises(InputError, match="NaN or infinite"):
                answer(bad)
    runs = len(ran)
    with pytest.raises(InputError, match="more than the limit"):
        answer({"x": np.zeros((201, 64), np.float32)})
    assert len(ran) == runs  # refused feeds never reach the model
    cast, _ = answer({"x": np.zeros((2, 64), np.float64)})  # the full check casts
    assert cast["x"].dtype == np.float32 and ran[-1] is cast
    for _ in range(2):  # a refused shape is never taken for a checked one
        for shape in ((2, 63), (2, 64, 1), (0, 64)):
            with pytest.raises(InputError):
                answer({"x": np.zeros(shape, np.float32)})
    assert len(ran) == runs + 1


@pytest.mark.parametrize("rows", [1, 6, 7])  # 7 x 10 scores take numpy's path
def test_confidence_is_the_largest_probability(rows: int) -> None:
    rng = np.random.default_rng(rows)
    logits = rng.normal(size=(rows, 10)).astype(np.float32) * 5
    probs = probabilities(rng.random((rows, 10))).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    mixed = np.concatenate([logits[: rows // 2], probs[rows // 2:]])
    for scores in (logits, probs, mixed, -np.abs(logits)):
        assert np.allclose(confidence(scores), probabilities(scores).max(axis=1),
                           rtol=1e-12, atol=0)
    with np.errstate(invalid="ignore"):
        for value in (np.nan, np.inf):
            bad = logits.copy()
            bad[0, 3] = value
            assert np.array_equal(confidence(bad), probabilities(bad).max(axis=1),
                                  equal_nan=True)


def test_check_of_several_inputs_runs_the_full_check() -> None:
    validator = InputValidator([TensorSpec("a", "float32", ["batch", 4]),
                                TensorSpec("b", "int64", ["batch", 2])], max_batch=8)
    answer = validator.answerer(lambda feeds: sorted(feeds))
    feeds, names = answer({"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 2), np.int64)})
    assert names == ["a", "b"] and feeds["b"].dtype == np.int64
    with pytest.raises(InputError, match="missing"):
        answer({"a": np.zeros((2, 4), np.float32)})


def test_statistics_fold_keeps_counts_exact() -> None:
    stats = RequestStats()
    latencies = [0.00001 * (1 + i % 37) for i in range(50_000)]
    primary = np.zeros((1, 10), np.float32)
    for i, latency in enumerate(latencies):
        stats.record("http" if i % 3 else "mqtt", latency, primary if i % 2 else None)
    assert stats.requests_total == 50_000
    interval = stats.take()
    assert interval.requests == 50_000
    assert dict(interval.by_channel) == {"mqtt": 16_667, "http": 33_333}
    assert len(interval.latencies_s) == 20_000 and len(interval.outputs) <= 20_000
    hist = stats.latency_histogram()
    expected = [0] * (len(LATENCY_BUCKETS_S) + 1)
    for latency in latencies:
        expected[bisect.bisect_left(LATENCY_BUCKETS_S, latency)] += 1
    assert [n for _, n in hist.buckets] == np.cumsum(expected).tolist()
    assert hist.sum_s == pytest.approx(sum(latencies))


def test_probation_is_served_through_the_slot(tmp_path: Path, models: Models) -> None:
    agent = Agent(load_config(env={}, overrides={
        "model.dir": str(tmp_path / "models"), "telemetry.interval_s": 0.0,
        "model.package": str(models.signed_v1), "model.trusted_keys": [str(models.public_key)]}))
    seen: list[Served] = []
    agent.observe(seen.append)
    x, _ = models.data
    try:
        v1 = agent.model
        assert v1 is not None
        v2 = agent.slot.loader.load(models.signed_v2)
        watch = agent.slot.serve(v2, Probation(requests=3, seconds=0.0, max_error_rate=0.0,
                                               max_nonfinite_rate=0.0, max_latency_ms=None),
                                 previous=v1)
        assert watch is not None and agent.slot.probation is watch
        for i in range(3):
            assert agent.predict({"x": x[i : i + 1]}).model is v2
        verdict = watch.verdict()
        assert verdict is not None and verdict.passed and watch.requests == 3
        agent.slot.end_probation()
        assert agent.slot.probation is None and agent.model is v2
        agent.predict({"x": x[:2]})
        assert watch.requests == 3  # no longer watched
        assert [s.model.version for s in seen] == ["2.0.0"] * 4
        np.testing.assert_array_equal(seen[-1].feeds["x"], x[:2])
        assert seen[-1].outputs is not None and seen[-1].error is None
    finally:
        agent.stop()
