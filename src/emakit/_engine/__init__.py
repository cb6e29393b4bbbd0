"""emakit's private update engine: nothing outside the ``emakit`` package imports it.

Bottom-up: :mod:`.tensors` (tensor-list helpers) and :mod:`.collectives` (ranks, groups);
:mod:`.layout` (which tensors are averaged, copied or live); :mod:`.kernels` (the
arithmetic); :mod:`.placements` (where this rank's part of each tensor lives); :mod:`.plan`
(the typed operations of one update and the staleness watch); :mod:`.executors` (how a plan
runs); :mod:`.store` (the averaged tensors of one average) and :mod:`.views` (the average
read back in the model's form).
"""
