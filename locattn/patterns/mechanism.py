"""How a head group attends its keys: the *mechanism*, beside the pattern (which keys).

* ``softmax`` (the default): exact softmax attention over the pattern's keys.
* ``linear``: linear attention over every key the site allows (non-causal: all keys; causal: ``j <= i``; a
  boolean key-padding mask is honoured), with a feature map ``phi``::

      out_i = sum_j kappa(q_i, k_j) v_j / sum_j kappa(q_i, k_j),   kappa(q, k) = phi(q) . phi(k)

  A row whose denominator is 0 outputs 0.
* ``hybrid``: the pattern's keys ``P(i)`` (pattern & site mask & causal) get exact softmax weights, the other
  allowed keys the linear estimate, in one normalisation::

      out_i = (sum_{j in P(i)} e^{s_ij} v_j + sum_{j in A(i) \\ P(i)} kappa_ij v_j)
              / (sum_{j in P(i)} e^{s_ij}   + sum_{j in A(i) \\ P(i)} kappa_ij)

  with ``s_ij = scale * q_i . k_j`` and ``A(i)`` the keys the site allows. (Implementations subtract the row
  max ``m_i`` over ``P(i)`` from both sums' exponents; it cancels.) With ``feature_map = "favor"`` kappa
  estimates ``e^{s_ij}``, so the hybrid is an unbiased-in-expectation estimate of full softmax attention
  (Scatterbrain).

Feature maps (``locattn.codegen.linear.features`` computes them):

* ``elu``:  ``phi(x) = elu(x) + 1`` on q and k as the site gives them (the scale is not applied),
* ``relu``: ``phi(x) = relu(x)``,
* ``favor``: Performer's positive random features, ``features`` of them, drawn reproducibly from ``seed``::

      phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),   x = sqrt(scale) q  (keys: sqrt(scale) k),
      E_W[phi(x) . phi(y)] = exp(x . y) = exp(scale q . k)

  ``W`` [m, D]: orthogonal Gaussian blocks (QR of a Gaussian) whose rows are rescaled to the norms of
  independent Gaussian vectors (Performer's orthogonal random features), drawn in fp64 on the CPU from
  ``torch.Generator().manual_seed(seed)``; the same ``W`` serves every head and site with the same ``(D, m,
  seed)``. A negative scale flips the sign of the query side (``x = -sqrt(|scale|) q``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("softmax", "linear", "hybrid")
FEATURE_MAPS = ("elu", "relu", "favor")
#: the feature map a mechanism gets when none is given: elu for linear (Katharopoulos et al.), favor for hybrid
#: (the only map whose kernel estimates e^s, so the two sums of the hybrid share a scale)
DEFAULT_FEATURE_MAP = {"linear": "elu", "hybrid": "favor"}
DEFAULT_FEATURES = 64


class MechanismError(ValueError):
    """An invalid mechanism (unknown kind or feature map, features <= 0, ...)."""


@dataclass(frozen=True)
class Mechanism:
    """The mechanism of one head group. ``Mechanism()`` is softmax; its other fields are then unused.

    ``feature_map`` defaults per kind (:data:`DEFAULT_FEATURE_MAP`); ``features`` (the number of random
    features ``m``) and ``seed`` apply to ``favor`` only and keep their defaults otherwise, so equal
    mechanisms compare (and serialise) equal.

    Example::

        Mechanism("hybrid", "favor", features=128, seed=1)
    """

    kind: str = "softmax"
    feature_map: str = ""
    features: int = DEFAULT_FEATURES
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MechanismError(f"unknown mechanism {self.kind!r}; known: {list(KINDS)}")
        if self.kind == "softmax":
            if self.feature_map or self.features != DEFAULT_FEATURES or self.seed != 0:
                raise MechanismError("the softmax mechanism takes no feature_map, features or seed")
            return
        if not self.feature_map:
            object.__setattr__(self, "feature_map", DEFAULT_FEATURE_MAP[self.kind])
        if self.feature_map not in FEATURE_MAPS:
            raise MechanismError(f"unknown feature_map {self.feature_map!r}; known: {list(FEATURE_MAPS)}")
        for name in ("features", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise MechanismError(f"{name} must be an integer, got {v!r}")
        if self.features <= 0:
            raise MechanismError(f"features must be >= 1, got {self.features}")
        if self.seed < 0:
            raise MechanismError(f"seed must be >= 0, got {self.seed}")
        if self.feature_map != "favor" and (self.features != DEFAULT_FEATURES or self.seed != 0):
            raise MechanismError(f"features and seed apply to feature_map = 'favor' only, not {self.feature_map!r}")

    @property
    def is_softmax(self) -> bool:
        return self.kind == "softmax"

    def to_params(self) -> dict[str, Any]:
        """The JSON form carried in a site spec (only for non-softmax mechanisms)."""
        return {"kind": self.kind, "feature_map": self.feature_map, "features": self.features, "seed": self.seed}

    @classmethod
    def from_params(cls, d: dict[str, Any]) -> "Mechanism":
        return cls(**d)

    def describe(self) -> str:
        if self.is_softmax:
            return "softmax"
        fm = self.feature_map
        if fm == "favor":
            fm += f"x{self.features}" + (f",seed={self.seed}" if self.seed else "")
        return f"{self.kind}[{fm}]"


SOFTMAX = Mechanism()
