"""Gradient fidelity of CRS: the metric (`grad_fidelity`, shared with the training callback) and the meter
(`python -m vitcrs.fidelity`, `vitcrs.fidelity.meter.measure`).

    rel_err, cos = grad_fidelity(sampled_grads, exact_grads)   # head excluded: measured_parameters(model)
"""

from .metric import grad_fidelity, measured_parameters, parameter_block, parameter_kind, rel_err_and_cos

__all__ = ["grad_fidelity", "measured_parameters", "parameter_block", "parameter_kind", "rel_err_and_cos"]
