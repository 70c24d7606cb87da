"""Labelled samples from the field: stored per prediction row, exported as an ``.npz``
dataset in the layout the converter reads. Part of :class:`edgekit.host.db.Store`."""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np
from sqlalchemy import func, select, update

from edgekit.data import Dataset
from edgekit.errors import DataError
from edgekit.host.db._engine import StoreBase, redact
from edgekit.host.db._records import SampleIn
from edgekit.host.db._schema import SampleRow
from edgekit.host.db._timeutil import as_utc, iso, utcnow


class SampleStore(StoreBase):
    """The samples methods of :class:`edgekit.host.db.Store`."""

    def add_samples(self, fleet: str, device: str, samples: Iterable[SampleIn]) -> int:
        """Store samples; one already stored (same prediction id and row) is dropped.

        Returns:
            How many were new.

        Raises:
            DataError: a sample has no inputs, or an input that is not a numeric array.
        """
        rows = [dict(fleet=fleet, device_id=device, prediction_id=s.prediction_id, row=s.row,
                     model_name=s.model_name, model_version=s.model_version,
                     ts=as_utc(s.ts) if s.ts else utcnow(), inputs=_pack(s),
                     label=_plain(s.label), prediction=_plain(s.prediction))
                for s in samples]
        added = 0
        with self._tx() as conn:
            for values in rows:
                stmt = self._insert(SampleRow).values(**values).on_conflict_do_nothing(
                    index_elements=["fleet", "device_id", "prediction_id", "row"]
                ).returning(SampleRow.id)
                added += conn.execute(stmt).scalar() is not None
        return added

    def label_sample(self, fleet: str, device: str, prediction_id: str, label: Any, *,
                     row: int = 0) -> bool:
        """Attach a label that arrived after the sample; False when the sample is unknown."""
        with self._tx() as conn:
            done = conn.execute(update(SampleRow).where(
                SampleRow.fleet == fleet, SampleRow.device_id == device,
                SampleRow.prediction_id == prediction_id, SampleRow.row == row,
            ).values(label=_plain(label)))
            return done.rowcount == 1

    def count_samples(self, since: dt.datetime | None = None, fleet: str | None = None,
                      device: str | None = None, *, labelled: bool = True) -> int:
        """How many samples match (only labelled ones unless ``labelled`` is False)."""
        query = select(func.count()).select_from(SampleRow).where(
            *_sample_filters(since, fleet, device, labelled))
        with self._tx(write=False) as conn:
            return int(conn.execute(query).scalar_one())

    def export_samples(self, since: dt.datetime | None = None, fleet: str | None = None,
                       device: str | None = None) -> Dataset:
        """Labelled samples since ``since``, stacked per input, in time order.

        The result is what :func:`edgekit.data.save_npz` writes: inputs under their input
        names, labels under ``y``, the layout ``edgekit convert`` reads.

        Raises:
            DataError: no labelled sample matches, or the samples do not share one set of
                input names, shapes and dtypes (they come from different models).
        """
        query = (select(SampleRow.inputs, SampleRow.label, SampleRow.device_id,
                        SampleRow.prediction_id, SampleRow.row)
                 .where(*_sample_filters(since, fleet, device, True))
                 .order_by(SampleRow.ts, SampleRow.id))
        with self._tx(write=False) as conn:
            rows = list(conn.execute(query))
        scope = _describe_scope(since, fleet, device)
        if not rows:
            raise DataError(f"no labelled samples {scope}",
                            hint="widen --since, or check that devices send labelled samples")
        columns: dict[str, list[np.ndarray]] = {}
        first: dict[str, tuple[tuple[int, ...], str]] | None = None
        for row in rows:
            arrays = _unpack(row.inputs)
            layout = {k: (v.shape, v.dtype.str) for k, v in arrays.items()}
            if first is None:
                first, columns = layout, {k: [] for k in arrays}
            elif layout != first:
                raise DataError(
                    f"sample {row.prediction_id} (row {row.row}) of device {row.device_id}"
                    f" has inputs"
                    f" {_fmt_layout(layout)}, earlier samples {_fmt_layout(first)}",
                    hint="these samples come from different models: narrow the export with"
                         " --device or --since")
            for key, value in arrays.items():
                columns[key].append(value)
        labels = np.asarray([row.label for row in rows])
        if labels.dtype == object:
            raise DataError(f"labels of the samples {scope} do not form one array",
                            hint="labels must all be numbers, or lists of the same length")
        return Dataset({k: np.stack(v) for k, v in columns.items()}, labels,
                       f"field samples {scope} ({redact(self.url)})")


def _sample_filters(since: dt.datetime | None, fleet: str | None, device: str | None,
                    labelled: bool) -> list[Any]:
    filters: list[Any] = []
    if labelled:
        filters.append(SampleRow.label.is_not(None))
    if since is not None:
        filters.append(SampleRow.ts >= as_utc(since))
    if fleet is not None:
        filters.append(SampleRow.fleet == fleet)
    if device is not None:
        filters.append(SampleRow.device_id == device)
    return filters


def _describe_scope(since: dt.datetime | None, fleet: str | None, device: str | None) -> str:
    parts = [f"since {iso(since)}" if since else "of all time"]
    if fleet:
        parts.append(f"in fleet {fleet}")
    if device:
        parts.append(f"from device {device}")
    return " ".join(parts)


def _pack(sample: SampleIn) -> bytes:
    if not sample.inputs:
        raise DataError(f"sample {sample.prediction_id} has no inputs")
    arrays: dict[str, np.ndarray] = {}
    for name, value in sample.inputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"sample {sample.prediction_id}: input {name!r} is {arr.dtype},"
                            " not a numeric array")
        arrays[name] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"a stored sample is unreadable: {err}") from err


def _plain(value: Any) -> Any:
    """A label or prediction as JSON (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def _fmt_layout(layout: dict[str, tuple[tuple[int, ...], str]]) -> str:
    return ", ".join(f"{k}{list(shape)}:{np.dtype(d).name}" for k, (shape, d) in sorted(layout.items()))
