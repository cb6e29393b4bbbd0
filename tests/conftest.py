import importlib.util
import os

import pytest
import torch

# Composer pins an older torch: its tests run in their own venv (`make test-composer`).
# (Without the package, "composer" resolves to tests/composer, a namespace without origin.)
_composer = importlib.util.find_spec("composer")
collect_ignore = [] if _composer is not None and _composer.origin else ["composer"]

# Two cores: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
