"""The gradient-fidelity meter: `python -m vitcrs.fidelity` (`vitcrs.fidelity.cli`) measures, with
`vitcrs.fidelity.meter.measure`, how far CRS-sampled gradients lie from the exact one. The metric it
shares with the training callback is `vitcrs.models.fidelity`."""
