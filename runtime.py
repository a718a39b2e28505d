"""Import Keras (TensorFlow backend) without TensorFlow's C++ start-up chatter on stderr.

Import this module before keras in every entry point. TensorFlow prints its oneDNN/CUDA notices
from C++ before its logging is configured, so only silencing file descriptor 2 while it loads
hides them; real import errors still raise normally.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_quietly():
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras

        keras.ops.convert_to_tensor(0.0)  # initialise the devices while stderr is silenced
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_quietly()
