"""The figures command: every CIFAR-10 figure from the shipped model, the same bytes on every run."""
import numpy as np

from conftest import ROOT, run_cli, write_image
from data.cifar10 import CLASS_NAMES

CIFAR_FIGURES = {f"cifar10_layers_{i}.png" for i in range(1, 6)} | {"cifar10_grid.png", "cifar10_acc.png",
                                                                    "cifar10_loss.png", "cifar10_schedules.png"}


def test_figures_command_reproduces_the_cifar10_figures(tmp_path):
    """A tiny CIFAR-10 layout (3 test pictures a class) through the shipped model, twice."""
    rng = np.random.default_rng(0)
    for name in CLASS_NAMES:
        (tmp_path / "cifar" / "train" / name).mkdir(parents=True)
        for i in range(3):
            write_image(tmp_path / "cifar" / "test" / name / f"{i}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    assert (ROOT / "models" / "cifar10.keras").is_file()
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = run_cli("figures.py", "--cifar-dir", tmp_path / "cifar", "--only", "cifar10", "--skip-eval", "--out", out)
        assert r.returncode == 0, r.stderr
        assert {p.name for p in out.iterdir()} == CIFAR_FIGURES
        outputs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outputs[0] == outputs[1], "the figures differ between two runs"
