import sys
from pathlib import Path

import pytest
import torch

from conchshell.utils import precision
from conchshell.utils.precision import cpu_has_bf16_kernels

# Tests run on 2-core CI machines; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))
sys.path.insert(0, str(Path(__file__).parent))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # bf16 through the full-size image networks (TCNN-6 and I3D at 224 x 224) takes minutes
    # per call where torch emulates it (an AVX2-only CPU): those tests need the kernels.
    if item.get_closest_marker("needs_bf16_kernels") and not cpu_has_bf16_kernels():
        pytest.skip("this CPU has no bf16 kernels: bf16 through the full-size image networks would take minutes")
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)")


@pytest.fixture
def as_if_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run bf16 wherever it is asked for, as on a CPU with bf16 kernels: for tests of the bf16
    code paths on tiny networks, where torch's scalar fallbacks are quick enough."""
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: True)


@pytest.fixture
def as_if_no_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16 kernels (x86 with AVX2 only), on any machine."""
    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: False)
