# Composer pins an older torch, so it lives in a venv of its own (`make test-composer`).
# Where it is not installed, collect neither its adapter (doctests) nor its tests. (Without
# the package, "composer" can resolve to tests/composer: a namespace package, no origin.)
import importlib.util

_composer = importlib.util.find_spec("composer")
if _composer is None or _composer.origin is None:
    collect_ignore = ["src/emakit/integrations/composer.py", "tests/composer"]
