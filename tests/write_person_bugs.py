"""Issue 30's eight hand-written bugs, each written into a scratch copy of the repository (its tracked files)
and tests/test_person_bugs.py run against it: every bug must fail at least one test. A developer command,
not part of the suite (about 30 s a bug on two cores):

    python tests/write_person_bugs.py

Prints each bug's failing tests and exits 1 if a bug passes the whole file.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUGS = {  # name: (file, the line as it is, the line with the bug)
    "1 the registered Faster-Score-CAM runs every channel": (
        "kerascam/methods.py",
        'def faster_score_cam(model, images, layer=None, class_index=None, batch_size="auto", max_n=16,',
        'def faster_score_cam(model, images, layer=None, class_index=None, batch_size="auto", max_n=None,'),
    "2 a Dropout after the softmax not skipped by the score rule": (
        "kerascam/graph.py",
        "if isinstance(layer, (keras.layers.Identity, keras.layers.Dropout)):",
        "if isinstance(layer, (keras.layers.Identity,)):"),
    "3 a one-unit output scored (0, z)": (
        "kerascam/graph.py",
        "scores = keras.ops.concatenate([-scores / 2, scores / 2], axis=-1)",
        "scores = keras.ops.concatenate([keras.ops.zeros_like(scores), scores], axis=-1)"),
    "4 the sanity check explains the copy for the copy's own class": (
        "kerascam/sanity.py",
        "fn(copy, images, layer, targets, batch_size)",
        "fn(copy, images, layer, None, batch_size)"),
    "5 the sanity check's copy never gets the trained weights": (
        "kerascam/sanity.py",
        "copy = copy_model(model)",
        "copy = keras.models.clone_model(model)"),
    "6 the summary reports the median": (
        "kerascam/metrics.py",
        "out[key] = float(np.mean(v))",
        "out[key] = float(np.median(v))"),
    "7 the time interval does not weight chunks by their size": (
        "kerascam/metrics.py",
        "means = (per_chunk[pick] * sizes[pick]).sum(axis=1) / sizes[pick].sum(axis=1)",
        "means = per_chunk[pick].mean(axis=1)"),
    "8 the insertion blurs with sigma 5 whatever it is given": (
        "kerascam/metrics.py",
        "return perturbation_curves(model, blur(images, sigma), images,",
        "return perturbation_curves(model, blur(images, BLUR_SIGMA), images,"),
}


def scratch_copy(into):
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())


def main():
    missed = []
    for name, (path, line, bug) in BUGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            scratch_copy(Path(tmp))
            source = Path(tmp, path)
            text = source.read_text()
            if text.count(line) != 1:
                sys.exit(f"error: {path} no longer has the line {line!r} once; update BUGS")
            source.write_text(text.replace(line, bug))
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:randomly", "-p",
                                  "no:cacheprovider", "tests/test_person_bugs.py"], cwd=tmp, capture_output=True, text=True)
        failed = sorted(set(re.findall(r"^FAILED (\S+)", run.stdout, re.M)))
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-300:]
        print(f"bug {name}: {last} ({time.perf_counter() - start:.0f} s)", flush=True)
        for test in failed:
            print(f"    {test}", flush=True)
        if not failed:
            missed.append(name)
    print(f"{len(BUGS) - len(missed)} of {len(BUGS)} bugs fail a test")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
