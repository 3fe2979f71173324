"""Shared test fixtures and helpers."""
import contextlib
import importlib.util
import json
import os

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_entry_point(relative_path: str, module_name: str):
    """Import a script by path (`import test` could find the standard library's `test` package instead)."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def single_thread():
    """Tiny models are overhead-bound: several threads only contend, and slow down a busy machine. Restores the
    thread count however the block ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


class InputRecorder(nn.Module):
    """Wraps a model and records every input row it is asked to classify (flattened, detached copies)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(x.detach().flatten(1).clone())
        return self.model(x)


def read_metrics(run_dir):
    """The per-epoch records of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]
