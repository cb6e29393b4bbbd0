"""Composer's own EMA tests, ported to emakit.

Source: mosaicml/composer ``tests/algorithms/test_ema.py`` at commit
6405188805a0054b4551ec49e4919c54c971d0e8 (the file last changed in
83cb5c14a89fc5dcb69db0b92131e61e6ff4ae8a). Its two tests, with their parametrizations:

- ``test_ema``: the functional update, ``compute_ema(model, ema_model, smoothing)``, for
  smoothing 0, 0.5, 0.99 and 1, checked parameter by parameter and buffer by buffer;
- ``test_ema_algorithm``: the algorithm with (half_life, update_interval) = (10ba, 1ba),
  (1ep, 1ep) and smoothing 0.999 at 1ba: its smoothing, one update, the average swapped in
  at EVAL_START and the training weights back at EVAL_END.

Differences from the original, where emakit differs by design:
- Composer's test replaces ``state.model`` by a new model to fake a training step; an
  emakit EMA is bound to its model object, so the new weights are loaded into it instead,
  and the start copy is one update event with the original weights (Composer's test builds
  its ``EMAParameters`` by hand for that).
- The models are rebuilt here (Composer's ``tests.common`` is not installed):
  ``SimpleConvModel`` and ``SimpleTransformerClassifier`` as in Composer's
  ``tests/common/models.py``; ``configure_tiny_bert_hf_model`` (needs transformers, which
  this environment does not have) is replaced by a model with BatchNorm, so that floating
  and integer buffers are exercised too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from composer.core import Event, State, Time, TimeUnit
from composer.devices import DeviceCPU
from composer.loggers import Logger
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit.integrations.composer import EMA


class Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def simple_conv_model() -> ComposerClassifier:
    conv_args = {"kernel_size": (3, 3), "padding": 1, "stride": 2}
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, **conv_args), torch.nn.Conv2d(8, 4, **conv_args),
        torch.nn.Identity(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 16), torch.nn.Linear(16, 2),
    )
    return ComposerClassifier(module=net, num_classes=2)


def simple_transformer_classifier() -> ComposerClassifier:
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=16,
                                             dropout=0.3)
    transformer = torch.nn.TransformerEncoder(layer, num_layers=2,
                                              norm=torch.nn.LayerNorm(16),
                                              enable_nested_tensor=False)
    base = torch.nn.Sequential(torch.nn.Embedding(10, 16), transformer)
    net = torch.nn.Sequential(base, Mean(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    return ComposerClassifier(module=net, num_classes=2)


def batchnorm_model() -> ComposerClassifier:
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2))
    model = ComposerClassifier(module=net, num_classes=2)
    model.train()
    with torch.no_grad():  # distinct running statistics per instance
        model.module(torch.randn(16, 5))
    return model


MODELS = [simple_conv_model, simple_transformer_classifier, batchnorm_model]


def validate_ema(model, original_model, ema_model, smoothing):
    model_params, model_buffers = dict(model.named_parameters()), dict(model.named_buffers())
    original_params = dict(original_model.named_parameters())
    original_buffers = dict(original_model.named_buffers())
    ema_params, ema_buffers = dict(ema_model.named_parameters()), dict(ema_model.named_buffers())

    for name, param in model_params.items():
        new_param = original_params[name] * smoothing + (1.0 - smoothing) * param
        torch.testing.assert_close(ema_params[name].data, new_param)

    for name, buffer in model_buffers.items():
        if not buffer.is_floating_point():
            # emakit copies integer buffers (BatchNorm's num_batches_tracked); Composer's
            # formula would truncate s * old + (1 - s) * new instead.
            torch.testing.assert_close(ema_buffers[name].data, buffer)
            continue
        new_buffer = (original_buffers[name] * smoothing + (1.0 - smoothing) * buffer).type(
            ema_buffers[name].data.dtype)
        torch.testing.assert_close(ema_buffers[name].data, new_buffer)


def validate_model(model1, model2):
    model1_params, model1_buffers = dict(model1.named_parameters()), dict(model1.named_buffers())
    model2_params, model2_buffers = dict(model2.named_parameters()), dict(model2.named_buffers())
    for name in model1_params.keys():
        torch.testing.assert_close(model1_params[name].data, model2_params[name].data)
    for name in model1_buffers.keys():
        torch.testing.assert_close(model1_buffers[name].data, model2_buffers[name].data)


@pytest.mark.parametrize("smoothing", [0, 0.5, 0.99, 1])
@pytest.mark.parametrize("model_cls", MODELS)
def test_ema(smoothing, model_cls):
    model = model_cls()
    ema_model = model_cls()
    original_model = copy.deepcopy(ema_model)
    emakit.compute_ema(model=model, ema_model=ema_model, smoothing=smoothing)
    validate_ema(model, original_model, ema_model, smoothing)


def minimal_state(model) -> State:
    dataset = TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))
    return State(model=model, run_name="minimal_run_name", device=DeviceCPU(),
                 rank_zero_seed=0, max_duration="100ep", dataloader=DataLoader(dataset),
                 dataloader_label="train")


def model_with_weights(template, weights):
    out = copy.deepcopy(template)
    out.load_state_dict(weights)
    return out


@pytest.mark.parametrize("params", [
    {"half_life": "10ba", "update_interval": "1ba"},
    {"half_life": "1ep", "update_interval": "1ep"},
    {"smoothing": 0.999, "update_interval": "1ba"},
])
@pytest.mark.parametrize("model_cls", MODELS)
def test_ema_algorithm(params, model_cls):
    if "smoothing" in params:
        algorithm = EMA(half_life=None, smoothing=params["smoothing"],
                        update_interval=params["update_interval"])
    else:
        algorithm = EMA(half_life=params["half_life"], update_interval=params["update_interval"])
    state = minimal_state(model_cls())
    logger = Logger(state)
    algorithm.apply(Event.INIT, state, logger)

    # Check if ema correctly calculated smoothing
    update_interval = Time.from_timestring(params["update_interval"])
    if "half_life" in params:
        half_life = Time.from_timestring(params["half_life"])
        smoothing = np.exp(-np.log(2) * (update_interval.value / half_life.value))
        # the per-update smoothing (emakit's ema.smoothing is 0 until the start copy)
        np.testing.assert_allclose(np.asarray(smoothing),
                                   np.asarray(algorithm.config.max_smoothing()))

    def update_event():
        if update_interval.unit == TimeUnit.BATCH:
            algorithm.apply(Event.BATCH_END, state, logger)
        elif update_interval.unit == TimeUnit.EPOCH:
            algorithm.apply(Event.EPOCH_END, state, logger)
        else:
            raise ValueError("Invalid time string for parameter half_life")

    # Start EMA: the first update event copies the model (Composer's test builds the copy)
    original_model = copy.deepcopy(state.model)
    update_event()
    assert algorithm.ema.started
    smoothing = algorithm.ema.smoothing  # that of the next update
    if "smoothing" in params:
        assert smoothing == params["smoothing"]
    # Fake a training update: new weights in the same model object
    new_weights = model_cls().state_dict()
    state.model.load_state_dict(new_weights)
    training_updated_model = copy.deepcopy(state.model)
    # Do the EMA update
    update_event()
    ema_updated_model = model_with_weights(state.model, algorithm.ema.ema_state_dict())
    # Check if EMA correctly computed the average.
    validate_ema(state.model, original_model, ema_updated_model, smoothing)
    # Check if the EMA model is swapped in for testing
    algorithm.apply(Event.EVAL_START, state, logger)
    validate_model(state.model, ema_updated_model)
    # Check if the training model is swapped back in for training
    algorithm.apply(Event.EVAL_END, state, logger)
    validate_model(state.model, training_updated_model)
