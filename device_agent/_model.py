"""A verified model loaded into a runtime, and the answer to one request.

:func:`load_model` verifies a package (every member's sha256, the signature against the
trusted keys), loads it with :mod:`edgekit.runtimes` and runs its golden samples, which both
proves the runtime gives the outputs the converter recorded and warms the session up.
(:class:`~device_agent._slot.ModelSlot` holds the one in service).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgekit.artifact import VerifyReport, open_package, sha256_file, verify_package
from edgekit.errors import RuntimeBackendError
from edgekit.manifest import Manifest, Task
from edgekit.protocol import ModelRef, VariantSection
from edgekit.runtimes import RuntimeOptions, Session, backend_for, load_session
from edgekit.signing import load_public_key

from ._inputs import InputValidator
from ._variants import choose_variant, golden_excess

__all__ = ["LoadedModel", "Prediction", "TrustPolicy", "load_model"]


@dataclass(frozen=True)
class TrustPolicy:
    """Which packages the device accepts: signed by a trusted key, or unsigned when allowed."""

    trusted_keys: tuple[Ed25519PublicKey, ...] = ()
    allow_unsigned: bool = False

    @classmethod
    def from_files(cls, paths: list[str], allow_unsigned: bool) -> TrustPolicy:
        """Raises: UsageError: a key file is missing or not an Ed25519 public key."""
        return cls(tuple(load_public_key(p) for p in paths), allow_unsigned)

    def verify(self, path: str | Path, *, deferred: Collection[str] = ()) -> VerifyReport:
        """Check every member's sha256 (but ``deferred``'s, which the caller reads with
        :meth:`~edgekit.artifact.Package.read_member`, checked as they are read) and the
        signature.

        Raises:
            ArtifactError: a member is missing or altered.
            SignatureError: unsigned while signatures are required, an untrusted signer, or a
                signature that does not match.
        """
        return verify_package(path, list(self.trusted_keys),
                              require_signature=not self.allow_unsigned, deferred=deferred)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A verified package in a runtime session. Immutable: a new model is a new object."""

    path: Path
    sha256: str
    manifest: Manifest
    session: Session
    validator: InputValidator
    runtime: str
    signed: bool
    key_id: str | None
    # Which of the package's variants serves and the measurements behind the choice; None
    # for a package of one artifact. ``manifest`` then reads as the chosen variant's.
    variant: VariantSection | None = None
    ref: ModelRef = field(init=False)
    num_classes: int | None = field(init=False)
    primary_output: str = field(init=False)  # the output whose argmax is the class

    def __post_init__(self) -> None:
        m = self.manifest
        object.__setattr__(self, "ref", ModelRef(name=m.name, version=m.version,
                                                 sha256=self.sha256, format=m.format.value,
                                                 runtime=self.runtime))
        object.__setattr__(self, "num_classes", _num_classes(m))
        object.__setattr__(self, "primary_output", m.outputs[0].name)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def label_name(self, index: int) -> str:
        labels = self.manifest.labels
        return labels[index] if labels and 0 <= index < len(labels) else str(index)

    def run_golden(self) -> float | None:
        """Run the manifest's golden samples; return the largest error over tolerance.

        Returns None when the package holds no golden samples, else the largest
        ``|out - expected| - (atol + rtol * |expected|)`` (at most 0 when all are within).

        Raises:
            RuntimeBackendError: the runtime fails on the golden inputs.
            ArtifactError: the golden member is unreadable.
        """
        golden_in, golden_out = open_package(self.path).golden(self.manifest.golden.get("file"))
        if not golden_in:
            return None
        return golden_excess(self.session.run(golden_in), golden_out,
                             float(self.manifest.golden.get("atol", 1e-4)),
                             float(self.manifest.golden.get("rtol", 1e-3)))


def _num_classes(m: Manifest) -> int | None:
    if m.task != Task.CLASSIFICATION.value or not m.outputs:
        return None
    shape = m.outputs[0].shape
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]
    return len(m.labels) if m.labels else None


def load_model(path: str | Path, trust: TrustPolicy, options: RuntimeOptions | None = None,
               *, max_batch: int = 256, check_golden: bool = True,
               sha256: str | None = None) -> LoadedModel:
    """Verify a package, load it into its runtime and check it against its golden samples.

    ``sha256``: the file's, when the caller has just checked it (an update hashes the bytes
    as it downloads them); else the file is hashed here.

    A package of several variants is measured first (:mod:`device_agent._variants`): the
    fastest variant that passes parity within the package's accuracy budget is loaded.

    Raises:
        ArtifactError: the package is missing, corrupt or altered.
        SignatureError: the trust policy refuses it.
        RuntimeBackendError: no runtime for its format, the runtime cannot load it, or its
            outputs on the golden samples are outside the manifest's tolerance.
    """
    p = Path(path)
    pkg = open_package(p)
    # The model member is checked as model_bytes() reads it (read_member compares it with the
    # signed manifest before the runtime sees a byte), not inflated and hashed twice.
    report = trust.verify(p, deferred=() if pkg.manifest.variants
                          else (pkg.manifest.model_file,))
    manifest = pkg.manifest
    variant = None
    if manifest.variants:
        variant, manifest, session = choose_variant(pkg, options)
    else:
        session = load_session(manifest, pkg.model_bytes(), options)
    model = LoadedModel(
        path=p,
        sha256=sha256 or sha256_file(p),
        manifest=manifest,
        session=session,
        validator=InputValidator(manifest.inputs, max_batch, f"{manifest.name} {manifest.version}"),
        runtime=backend_for(manifest.format.value).KEY,
        signed=report.signed,
        key_id=report.key_id,
        variant=variant,
    )
    if check_golden:
        excess = model.run_golden()
        if excess is not None and excess > 0:
            raise RuntimeBackendError(
                f"{p.name}: outputs on the golden samples differ from the package's by up to"
                f" {excess:.3g} beyond its tolerance (atol {manifest.golden.get('atol')},"
                f" rtol {manifest.golden.get('rtol')})",
                hint="this runtime does not reproduce the converter's results; check the"
                " runtime version (edgekit-agent doctor) or reconvert",
            )
    return model


class Prediction:
    """One answered request. ``outputs`` belong to the caller, who reads them and does not
    change them in place (the agent keeps the primary output for its telemetry and for the
    prediction's label). ``id``, ``classes`` and ``confidence`` are computed when first read
    (``classes`` and ``confidence``: classifiers only, else None)."""

    # A plain class with slots: it is made on every request, and a frozen dataclass costs
    # several times more to construct.
    __slots__ = ("_classes", "_confidence", "_prefix", "_seq", "latency_ms", "model", "outputs")

    def __init__(self, prefix: str, seq: int, outputs: dict[str, np.ndarray],
                 model: LoadedModel, latency_ms: float) -> None:
        self._prefix = prefix
        self._seq = seq
        self.outputs = outputs
        self.model = model
        self.latency_ms = latency_ms
        self._classes: np.ndarray | None = None
        self._confidence: np.ndarray | None = None

    @property
    def id(self) -> str:
        """The prediction id feedback names (unique for the agent's life)."""
        return self._prefix + str(self._seq)

    def __repr__(self) -> str:
        return f"Prediction(id={self.id!r}, model={self.model.name} {self.model.version})"

    def _scores(self) -> np.ndarray:
        scores = np.asarray(self.outputs[self.model.primary_output])
        return scores.reshape(len(scores), -1)

    @property
    def classes(self) -> np.ndarray | None:
        if self.model.num_classes is None:
            return None
        if self._classes is None:
            self._classes = self._scores().argmax(axis=1)
        return self._classes

    @property
    def confidence(self) -> np.ndarray | None:
        if self.model.num_classes is None:
            return None
        if self._confidence is None:
            self._confidence = confidence(self._scores())
        return self._confidence

    @property
    def labels(self) -> list[str] | None:
        classes = self.classes
        return None if classes is None else [self.model.label_name(int(c)) for c in classes]


# Up to this many scores, :func:`confidence` works on Python floats: a reply to a small
# request would otherwise spend more on a dozen numpy calls than on the model.
_SMALL_SCORES = 64


def confidence(scores: np.ndarray) -> np.ndarray:
    """``probabilities(scores).max(axis=1)`` (float64): the largest probability of each row,
    for a softmax row ``1 / sum(exp(row - max(row)))``."""
    if scores.size > _SMALL_SCORES:
        return probabilities(scores).max(axis=1)
    out = []
    for row in scores.tolist():
        top, total = max(row), sum(row)
        if not math.isfinite(total):  # NaN or infinity: numpy's rules, not max()'s
            return probabilities(scores).max(axis=1)
        if min(row) >= 0 and abs(total - 1.0) < 1e-3:
            out.append(top)
        else:
            out.append(1.0 / sum([math.exp(v - top) for v in row]))
    return np.asarray(out, dtype=np.float64)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that already are probabilities stay; other rows (logits) go through softmax."""
    rows = np.asarray(scores, dtype=np.float64)
    sums = rows.sum(axis=1, keepdims=True)
    is_prob = (rows >= 0).all(axis=1, keepdims=True) & (np.abs(sums - 1.0) < 1e-3)
    shifted = rows - rows.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    soft = exp / exp.sum(axis=1, keepdims=True)
    return np.where(is_prob, rows, soft)
