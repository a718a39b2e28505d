"""Shared fixtures: repository paths, ../shared data (skipped when absent), tiny models and folders."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402,F401  (quiet TensorFlow start-up before keras)


# The backend-sensitive subset, run a second time with KERAS_BACKEND=jax (README's test command):
# module -> name fragments of the tests to run there (None: all of them). The model, Score-CAM's known
# answers and its fast path against the plain computation, the bfloat16 copy, every gradient method
# (the one per-backend function), models of any input size, training resumed after a kill, and the
# command line. Everything else is backend-neutral NumPy, file handling or command-line plumbing
# already covered on TensorFlow; JAX compiles each new shape, so each test here costs seconds.
JAX_SUBSET = {
    "test_model.py": ("parameter_count", "takes_pixels", "save_and_load", "class_count"),
    "test_scorecam.py": ("known_answer", "constant_channels", "matches_reference", "low_resolution", "default_layer",
                         "all_layers_from_one_call", "bad_arguments", "normalise"),
    "test_fast_paths.py": ("naive_reference", "uneven_batches", "chunk_and_batch", "only_max_n", "bfloat16_copy_agrees",
                           "auto_precision", "adapted_normalization"),
    "test_gradcam.py": None,
    "test_own_models.py": None,
    "test_signed_answers.py": None,
    "test_any_model.py": ("sigmoid", "any_input_size", "gradient_methods", "layer_cam_by_hand", "layer_lookup",
                          "multi_input", "wrong_shape", "layer_name", "named_alike"),
    "test_train.py": ("sigkill",),
    "test_regularise.py": ("resumes", "average"),
    "test_scorecam_cli.py": ("good_missing", "jpeg[gradcampp]"),
    "test_backbones.py": ("operation_nodes_explained", "maps_do_not_change[64]"),
    "test_beyond.py": None,
    "test_package.py": ("eigen", "hires", "registry_records"),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a large keras.applications model (about 10 s on 2 cores); "
                                       "-m 'not heavy' leaves them out")


def pytest_collection_modifyitems(config, items):
    import keras

    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"backend-neutral: runs on TensorFlow only ({keras.backend.backend()} runs "
                                   "the backend-sensitive subset, tests/conftest.py JAX_SUBSET)")
    for item in items:
        wanted = JAX_SUBSET.get(item.path.name, ())
        if wanted is not None and not any(part in item.name for part in wanted):
            item.add_marker(skip)


def shared_file(relative):
    """A file from ../shared, or skip: a user's clone has no ../shared, CI has it."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/{relative} (present in CI, absent in a user's clone)")
    return path


def run_cli(*args, cwd=ROOT, timeout=300):
    """Run a repo command in a subprocess; returns CompletedProcess with text output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_color_folder(folder):
    """Three classes told apart by colour: red, green, blue pictures, 40x40, 10 each."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(["red", "green", "blue"]):
        for i in range(10):
            a = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
            a[..., k] += 180
            write_image(folder / name / f"{i}.png", a)
    return folder


@pytest.fixture
def color_folder(tmp_path):
    return make_color_folder(tmp_path / "colors")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """An untrained build_model at 32x32 with 10 classes, saved with class names."""
    from data.cifar10 import CLASS_NAMES
    from model import build_model, save_model

    keras_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    save_model(build_model(), path, CLASS_NAMES)
    return path


def budget(n):
    """n generated cases a test, times $PROPERTY_EXAMPLES (default 1) for a longer hunt on a developer's machine."""
    return n * int(os.environ.get("PROPERTY_EXAMPLES", "1"))


def keras_seed(seed):
    import keras

    keras.utils.set_random_seed(seed)
