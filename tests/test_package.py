"""The library as a user takes it home (issue 26): `pip install` into a folder and imported from outside the
repository, no side effects on import, a registry that the command line, explain() and evaluate.py read, and
the two methods added through it (Eigen-CAM, HiRes-CAM) against plain implementations written here."""
import os
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest

import kerascam
from conftest import ROOT, keras_seed


def tiny_model(channels=6, classes=3, size=12, pool="average"):
    """Two convs and a softmax head; pool="flatten" makes the score's gradient vary from pixel to pixel."""
    keras_seed(0)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv2")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x) if pool == "average" else keras.layers.Flatten()(x)
    logits = keras.layers.Dense(classes, name="logits")(pooled)
    return keras.Model(inp, keras.layers.Softmax()(logits))


def images_for(n=3, size=12, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_pip_install_gives_an_importable_package_outside_the_repository(tmp_path):
    """`pip install --no-deps --target` (no build isolation: offline) and `import kerascam` from a folder with
    no model.py, data/ or scorecam.py of ours on the path; Score-CAM runs on a tiny model there."""
    import shutil

    target, elsewhere, source = tmp_path / "site", tmp_path / "user_project", tmp_path / "clone"
    elsewhere.mkdir()
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):  # built from a copy: the build leaves nothing in the checkout
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "kerascam", source / "kerascam", ignore=shutil.ignore_patterns("__pycache__"))
    (elsewhere / "model.py").write_text("raise ImportError('the user project own model.py, not ours')\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (target / "kerascam" / "__init__.py").is_file() and not (target / "scorecam.py").exists()
    code = textwrap.dedent("""
        import sys, numpy as np, keras, kerascam
        assert kerascam.__file__.startswith(sys.argv[1]), kerascam.__file__
        assert not any(p.rstrip("/").endswith("main") for p in sys.path if p), sys.path
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
        model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x)))
        maps = kerascam.score_cam(model, np.ones((2, 8, 8, 3), np.float32), precision="float32")
        print(maps.shape, sorted(kerascam.METHODS)[:3], len(kerascam.__all__))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2, 8, 8)" in r.stdout


IMPORT_PROBE = textwrap.dedent("""
    import importlib.abc, json, logging, os, sys
    sys.path.insert(0, sys.argv[1])
    import keras  # the backend's own start-up is not ours: the state is taken after it
    class Probe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "kerascam.maps":  # in the middle of the package's import
                os.write(2, b"fd2-still-open\\n")
            return None
    sys.meta_path.insert(0, Probe())
    def state():
        loggers = {name: (logger.level, len(logger.handlers), logger.disabled) for name, logger in
                   logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
        root = logging.getLogger()
        return {"env": dict(os.environ), "root": [root.level, len(root.handlers)], "loggers": loggers,
                "disable": logging.root.manager.disable}
    before = state()
    import kerascam
    after = state()
    changed = [k for k in before if before[k] != after[k]]
    new_loggers = set(after["loggers"]) - set(before["loggers"])
    print(json.dumps({"changed": changed, "new_loggers": sorted(new_loggers)}))
""")


def test_importing_the_package_changes_nothing_in_the_process():
    """No fd 2 redirection (a write to fd 2 in the middle of the import still arrives), no environment
    variable and no logging state changed by the package (Keras is imported first: its start-up is its own)."""
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fd2-still-open" in r.stderr
    import json

    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["changed"] == [], report


def test_an_unknown_backend_is_an_exception_not_an_exit():
    """KERAS_BACKEND naming no backend: Keras's own exception when the package is imported, never SystemExit
    (which would end a user's notebook kernel)."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        try:
            import kerascam
            print("imported")
        except SystemExit:
            print("SystemExit")
        except BaseException as e:
            print("exception", type(e).__name__)
    """)
    env = dict(os.environ, KERAS_BACKEND="no_such_backend")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300, env=env)
    assert r.stdout.strip().splitlines()[-1].startswith("exception"), (r.stdout, r.stderr[-1000:])


def test_the_registry_records_each_method_kind_and_options():
    methods = kerascam.METHODS
    assert set(m.kind for m in methods.values()) <= set(kerascam.KINDS)
    for method in methods.values():
        assert method.label and callable(method.function)
        assert "layer" not in method.options and "class_index" not in method.options
    assert methods["faster_scorecam"].options["max_n"] == 16 and methods["scorecam"].options["max_n"] is None
    assert methods["random"].floor and "seed" in methods["random"].options and not methods["gradcam"].floor
    assert kerascam.label("faster_scorecam", max_n=64) == "Faster-Score-CAM (64 ch.)"
    assert kerascam.label("faster_scorecam", max_n=0) == "Score-CAM"
    with pytest.raises(ValueError, match="takes no option max_n"):
        kerascam.explain("gradcam", tiny_model(), images_for(1), max_n=3)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from scorecam"):
        kerascam.explain("nope", tiny_model(), images_for(1))


def test_a_method_added_in_the_registry_reaches_the_cli_explain_and_evaluate():
    """One function and one register line, nothing else edited: scorecam.py's --method choices and help,
    kerascam.explain and explain_layers, and evaluate.py's method list and functions take it."""
    import evaluate
    import scorecam

    @kerascam.register("brightness", "Brightness floor", "activation")
    def brightness(model, images, layer=None, class_index=None, batch_size=8, gain=1.0):
        x = kerascam.check_images(model, images)
        return kerascam.normalise_maps(gain * x.mean(axis=-1))

    try:
        model, x = tiny_model(), images_for(2)
        assert "brightness" in scorecam.method_choices()
        assert scorecam.parser().parse_args(["--method", "brightness"]).method == "brightness"
        assert "brightness (Brightness floor)" in " ".join(scorecam.parser().format_help().split())
        np.testing.assert_array_equal(kerascam.explain("brightness", model, x, gain=2.0),
                                      kerascam.normalise_maps(x.mean(axis=-1)))
        maps, probs = kerascam.explain_layers("brightness", model, x, ["conv1", "conv2"])
        assert sorted(maps) == ["conv1", "conv2"] and probs.shape == (2, 3)
        assert "brightness" in evaluate.parse_args(["--methods", "brightness"]).methods
        assert "brightness" in evaluate.METHODS
        results = evaluate.evaluate(model, x, ["brightness"], steps=2, sanity_n=0, resamples=2)
        assert results["methods"]["brightness"]["label"] == "Brightness floor"
    finally:
        kerascam.METHODS.pop("brightness")
    assert "brightness" not in scorecam.method_choices()


def plain_maps(low_res, size):
    """ReLU, bilinear upsampling (cv2, half-pixel centres) and min-max normalisation, written out here."""
    maps = []
    for m in np.maximum(low_res, 0):
        up = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        span = up.max() - up.min()
        maps.append((up - up.min()) / span if span > 0 else np.zeros_like(up))
    return np.stack(maps)


def test_eigen_cam_is_the_first_principal_component_of_the_activations():
    """Per picture: the activation (h*w, K) centred per channel, its first right singular vector, the
    projection signed to agree with the channel sum; the same for every class (no score is used)."""
    model, x = tiny_model(channels=8), images_for(3)
    acts = keras.Model(model.inputs, model.get_layer("conv2").output).predict(x, verbose=0).astype(np.float64)
    low = []
    for a in acts:
        flat = a.reshape(-1, a.shape[-1])
        centred = flat - flat.mean(axis=0)
        u, s, vt = np.linalg.svd(centred, full_matrices=False)
        p = centred @ vt[0]
        if np.corrcoef(p, flat.sum(axis=1))[0, 1] < 0:
            p = -p
        low.append(p.reshape(a.shape[:2]))
    plain = plain_maps(np.stack(low), 12)
    fast = kerascam.eigen_cam(model, x, "conv2")
    np.testing.assert_allclose(fast, plain, atol=1e-4)
    assert (fast.max(axis=(1, 2)) == 1).all()
    np.testing.assert_array_equal(kerascam.eigen_cam(model, x, "conv2", class_index=2), fast)


def test_hires_cam_is_the_gradient_times_the_activation_summed_over_channels():
    """sum_k (dS_c/dA_k * A_k), pixel by pixel (no spatial average), with S_c the pre-softmax score, written
    with the backend's own autodiff. Under a global average pooling the gradient is the same at every pixel and
    HiRes-CAM is Grad-CAM; under a Flatten it is not, and the two differ."""
    from test_any_model import backend_gradient

    model, x = tiny_model(channels=5, pool="flatten"), images_for(2)
    front = keras.Model(model.inputs, model.get_layer("conv2").output)
    pool, dense = model.layers[-3], model.get_layer("logits")
    acts = np.asarray(front.predict(x, verbose=0))
    for target in (0, 2):
        grads = backend_gradient(lambda a: keras.ops.sum(dense(pool(a))[:, target]), acts)
        plain = plain_maps((grads.astype(np.float64) * acts).sum(-1), 12)
        fast = kerascam.hires_cam(model, x, "conv2", class_index=target)
        np.testing.assert_allclose(fast, plain, atol=2e-4)
    assert not np.allclose(kerascam.grad_cam(model, x, "conv2", class_index=2), fast, atol=1e-3)
