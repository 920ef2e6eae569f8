"""Layers: reparametrizations that control the singular values of weights.

* :func:`oni`: orthogonalization by Newton's iteration (Huang et al., CVPR 2020).
* :func:`weight_conditioning`: row/column equilibration (Saratchandran et al., ECCV 2024).
* :func:`layer_spectra`: per-layer σ_min, σ_max, κ and orthogonality error, for monitoring.

Both reparametrizations use ``torch.nn.utils.parametrize``: the raw weight stays the
trainable parameter and the layer computes its constrained form in every forward pass.
"""

from .oni import ONI, oni, oni_orthogonalize
from .spectra import LayerSpectrum, layer_spectra, matrix_as_weight, output_axis, spectra_table, weight_as_matrix
from .weight_conditioning import WeightConditioning, condition_weight, weight_conditioning

__all__ = [
    "ONI",
    "LayerSpectrum",
    "WeightConditioning",
    "condition_weight",
    "layer_spectra",
    "matrix_as_weight",
    "oni",
    "oni_orthogonalize",
    "output_axis",
    "spectra_table",
    "weight_as_matrix",
    "weight_conditioning",
]
