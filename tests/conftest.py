import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (full assets); run with SVFIT_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SVFIT_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set SVFIT_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
