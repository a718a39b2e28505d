"""For the entry points (scorecam.py, train.py, evaluate.py, ...) only, never the kerascam library: import
Keras quietly, on the backend KERAS_BACKEND names (tensorflow by default, or jax), and name the CPU.

Import this module before keras in every entry point, never in a library module: it changes the
process (an environment variable, file descriptor 2 while Keras loads, TensorFlow's logger). TensorFlow prints its oneDNN/CUDA notices
from C++ before its logging is configured, so only silencing file descriptor 2 while it loads
hides them; real import errors still raise normally. An unknown backend name ends the program
with one `error:` line instead of Keras's traceback.
"""
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKENDS = ("tensorflow", "jax", "torch")  # torch: the gradient is written, but it is not tested in CI
if os.environ.get("KERAS_BACKEND", "tensorflow") not in BACKENDS:
    sys.exit(f"error: unknown KERAS_BACKEND {os.environ['KERAS_BACKEND']!r}; use tensorflow (the default) or jax")


def _import_quietly():
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras

        keras.ops.convert_to_tensor(0.0)  # initialise the devices while stderr is silenced
        if keras.backend.backend() != "tensorflow":
            try:  # Keras imports TensorFlow on other backends too when it is installed (set_random_seed)
                import tensorflow  # noqa: F401
            except ImportError:
                pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_quietly()
# TensorFlow's Python-side warnings (its "triggered tf.function retracing" notice, printed when pictures of
# several sizes go through one model) to errors only, as TF_CPP_MIN_LOG_LEVEL does for its C++ side.
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def cpu_name():
    """The CPU's model name ("AMD EPYC 7B13"), from /proc/cpuinfo where platform.processor() gives only the
    architecture; timings name it, since machines of one kind differ."""
    import platform

    cpu = platform.processor()
    if cpu and cpu != platform.machine():
        return cpu
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu or platform.machine()
