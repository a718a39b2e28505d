"""Which devices to run on: one (Keras's default), or several sharded with Keras's DataParallel (JAX)."""
import numbers

import keras


def resolve_devices(spec):
    """The devices to run on for a devices option: None or 1 (one device, Keras's default), an
    int N (the first N), "all", or a list of device names ("cpu:0", "gpu:1"). Several devices
    need the JAX backend (Keras's distribution API); a clear ValueError says what to change."""
    present = keras.distribution.list_devices()
    if spec is None:
        return present[:1]
    if isinstance(spec, str) and spec != "all":
        try:
            spec = int(spec)
        except ValueError:
            spec = [name.strip() for name in spec.split(",")]
    several = spec == "all" and len(present) > 1 or isinstance(spec, (list, tuple)) and len(spec) > 1 or \
        isinstance(spec, int) and spec > 1
    if several and keras.backend.backend() != "jax":
        raise ValueError(f"several devices need the JAX backend (Keras's distribution API): run with "
                         f"KERAS_BACKEND=jax, or use one device (backend now: {keras.backend.backend()})")
    if spec == "all":
        return present
    if isinstance(spec, (list, tuple)):
        unknown = [d for d in spec if d not in present]
        if unknown:
            raise ValueError(f"unknown device(s) {', '.join(map(str, unknown))}; present: {', '.join(present)}")
        return list(spec)
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        if spec > len(present):
            raise ValueError(f"{spec} devices asked for, {len(present)} present ({', '.join(present)}); "
                             f"pass --devices {len(present)} or all")
        return present[:spec]
    raise ValueError(f"devices must be a count of at least 1, 'all' or device names, got {spec!r}")


def check_batch_size(batch_size, devices=None, option="batch_size"):
    """The one device-count check: batch_size an int of at least 1 that divides evenly over the
    devices (resolve_devices(devices)); returns those devices."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{option} must be an int of at least 1, got {batch_size!r}")
    chosen = resolve_devices(devices)
    if batch_size % len(chosen):
        raise ValueError(f"{option} {batch_size} does not divide evenly over {len(chosen)} devices; "
                         f"pass a multiple of {len(chosen)}")
    return chosen


def first_device():
    """The first device's name ("cpu:0"), part of what a measurement is cached under."""
    devices = keras.distribution.list_devices()
    return devices[0] if devices else "cpu"
