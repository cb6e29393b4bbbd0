"""Shared pieces of the benchmarks: the three models, the peers, timing and tables.

Models are built locally (no downloads, no torchvision): a compact ResNet-50 (25.6M
parameters in 161 tensors), a 12-layer BERT-base-sized transformer encoder (108.5M in 145
tensors) and 1000 x Linear(32, 32) (1.06M in 2000 tensors).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import emakit

# models ----------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's resnet50 layout: same tensors, names and shapes."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Encoder(nn.Module):
    """BERT-base-sized: 30522 x 768 embedding and 12 encoder layers (d=768, ff=3072)."""

    def __init__(self, vocab: int = 30522, d: int = 768, layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 12, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens))


def many_linear(n: int = 1000, width: int = 32) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "ResNet-50": (ResNet50, lambda: torch.randn(4, 3, 64, 64)),
    "transformer": (Encoder, lambda: torch.randint(0, 30522, (1, 32))),
    "1000 x Linear(32,32)": (many_linear, lambda: torch.randn(64, 32)),
}


def describe(model: nn.Module) -> str:
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    return f"{n / 1e6:.1f}M, {len(params)} tensors"


def averaged_numel(model: nn.Module) -> int:
    """Elements an EMA of the state dict averages: parameters and floating buffers."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


# peers -----------------------------------------------------------------------------------

DECAY = 0.999


def _timm_model_ema():
    """timm's ModelEmaV3, loaded from the installed file: `import timm` needs torchvision,
    which does not import beside this torch; model_ema.py itself imports only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (pip install -e '.[bench]')")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
    loader = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.ModelEmaV3


def seed_update(model: nn.Module):
    """The seed's compute_ema: per tensor, `ema.copy_(ema * s + (1 - s) * p)`, parameters
    only (its requires_grad filter drops every buffer)."""
    ema_model = copy.deepcopy(model)
    src = [p for p in model.parameters() if p.requires_grad]
    dst = [p for p in ema_model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update():
        s = DECAY
        for e, p in zip(dst, src, strict=True):
            e.copy_(e * s + (1.0 - s) * p.detach())

    return update, lambda: None


def timm_update(model: nn.Module):
    ema = _timm_model_ema()(model, decay=DECAY, foreach=True)
    return (lambda: ema.update(model)), lambda: None


def torch_update(model: nn.Module):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    ema.update_parameters(model)  # the first call copies
    return (lambda: ema.update_parameters(model)), lambda: None


def ema_pytorch_update(model: nn.Module, every: int = 1):
    from ema_pytorch import EMA

    ema = EMA(model, beta=DECAY, update_after_step=0, update_every=every, use_foreach=True)
    ema.update()  # the first call copies
    return ema.update, lambda: None


def diffusers_update(model: nn.Module):
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=DECAY, foreach=True)
    return (lambda: ema.step(model.parameters())), lambda: None


def emakit_update(model: nn.Module, interval: str = "1ba", **kwargs):
    ema = emakit.EMA(model, smoothing=DECAY, update_interval=interval, **kwargs)
    ema.update()  # starts the average
    return ema.step, ema.synchronize


PEERS: dict[str, Callable] = {
    "seed formula": seed_update,
    "timm ModelEmaV3": timm_update,
    "torch AveragedModel": torch_update,
    "ema-pytorch": ema_pytorch_update,
    "diffusers EMAModel": diffusers_update,
}

# timing and tables -------------------------------------------------------------------------


def sync(device: str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall-clock seconds of ``fn()``, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def setup_threads() -> int:
    n = int(os.environ.get("BENCH_THREADS", 1))
    torch.set_num_threads(n)
    return n


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    where = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}; host {where}"
    return f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads"
