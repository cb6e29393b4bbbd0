"""emakit: an exponential moving average of a PyTorch model's weights, done right.

>>> import torch, emakit
>>> model = torch.nn.Linear(3, 1)
>>> ema = emakit.EMA(model, half_life="100ba")
>>> ema.step()  # after each optimizer step
>>> model.load_state_dict(ema.ema_state_dict())
<All keys matched successfully>
"""

from . import distributed
from ._version import __version__
from .bema import BEMA
from .config import BEMAConfig, EMAConfig, PostHocEMAConfig, StoreConfig
from .ema import EMA, EMAModule
from .flat import flatten_parameters
from .functional import compute_ema
from .posthoc import PostHocEMA, synthesize
from .schedules import (
    CosineSmoothing,
    ExponentialRamp,
    MomentumAnnealing,
    PowerWarmup,
    RatioRamp,
    RunningMean,
    ZeroDebiased,
    gamma_to_sigma_rel,
    half_life_from_smoothing,
    sigma_rel_to_gamma,
    smoothing_from_half_life,
)
from .time import Time

__all__ = [
    "EMA",
    "EMAModule",
    "BEMA",
    "EMAConfig",
    "BEMAConfig",
    "PostHocEMAConfig",
    "StoreConfig",
    "PostHocEMA",
    "CosineSmoothing",
    "PowerWarmup",
    "ExponentialRamp",
    "RatioRamp",
    "ZeroDebiased",
    "MomentumAnnealing",
    "RunningMean",
    "Time",
    "compute_ema",
    "flatten_parameters",
    "gamma_to_sigma_rel",
    "half_life_from_smoothing",
    "sigma_rel_to_gamma",
    "smoothing_from_half_life",
    "synthesize",
    "__version__",
    "distributed",
]
