"""bench.py --profile: where a Score-CAM call's time goes on the running backend (KERAS_BACKEND).

    [KERAS_BACKEND=jax] python bench.py --profile [--sizes 32,64] [--n 16]

For each model size of bench.py (build_model, seeded, untrained; the last conv layer, K = 64), interleaved
(five rounds, the order reversed every other round, medians):

  T                   the model's predict_on_batch on 256 pictures;
  activation pass     the explainable graph (activations, output, scores) on the same 256 pictures;
  masked step         engine.MaskedScores on 256 (picture, channel) pairs: upsampling, normalising and
                      applying the masks, then the model: what a Score-CAM call runs K / 256 times a picture;
  masking alone       the same step with the model replaced by the identity (the masks' own cost);
  jitted stateless    (JAX) the masked step as one jax.jit of Keras's stateless_call, without Keras's
                      predict_on_batch around it (what Keras's dispatch costs);

then score_cam on --n pictures (after a call that compiles every shape) as passes a second against T,
and a cProfile of that call: the share of its time inside Keras's predict_on_batch (the compiled steps
and the copy of their results) against the Python around it.
"""
import cProfile
import pstats
import statistics
import time

ROUNDS = 5
B = 256


def _median_seconds(fns):
    for f in fns.values():
        f()
        f()
    times = {name: [] for name in fns}
    for r in range(ROUNDS):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def _identity_net(net):
    """A stand-in for the explainable graph with its inputs and outputs: the masked pictures, their mean per
    class slot (so MaskedScores' pick works), nothing of the model."""
    import keras

    inp = keras.Input(net.inputs[0].shape[1:])
    k = int(net.outputs[-1].shape[-1])
    flat = keras.ops.mean(inp, axis=(1, 2, 3), keepdims=False)[:, None] * keras.ops.ones((1, k))
    return keras.Model(inp, [flat, flat, flat])


def profile_size(side, classes, n, seed, log):
    import keras
    import numpy as np

    import kerascam
    from kerascam.engine import MaskedScores
    from kerascam.graph import explainable_cached
    from model import build_model

    keras.utils.set_random_seed(seed)
    model = build_model((side, side, 3), classes)
    ref = kerascam.find_layer(model)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (B, side, side, 3)).astype(np.float32)
    tapped = explainable_cached(model, [ref])
    k = int(tapped.outputs[0].shape[-1])
    grid = tuple(tapped.outputs[0].shape[1:3])
    pictures = rng.uniform(0, 255, (4, side, side, 3)).astype(np.float32)
    pairs = (pictures, rng.uniform(0, 1, (B,) + grid).astype(np.float32), (np.arange(B) % 4).astype(np.int32),
             np.zeros(B, np.int32))
    scorer = MaskedScores(explainable_cached(model), (side, side))
    masks_only = MaskedScores(_identity_net(explainable_cached(model)), (side, side))
    fns = {"T": lambda: np.asarray(model.predict_on_batch(x)),
           "activation pass": lambda: [np.asarray(v) for v in tapped.predict_on_batch(x)],
           "masked step": lambda: np.asarray(scorer.predict_on_batch(pairs)),
           "masking alone": lambda: np.asarray(masks_only.predict_on_batch(pairs))}
    if keras.backend.backend() == "jax":
        import jax

        scorer.predict_on_batch(pairs)  # built
        copy = lambda v: jax.numpy.array(v.value, copy=True)  # noqa: E731  (predict_on_batch donates its own)
        state = ([copy(v) for v in scorer.trainable_variables], [copy(v) for v in scorer.non_trainable_variables])
        step = jax.jit(lambda tv, ntv, inputs: scorer.stateless_call(tv, ntv, inputs)[0])
        fns["jitted stateless"] = lambda: np.asarray(step(*state, pairs))
    seconds = _median_seconds(fns)
    t = B / seconds["T"]
    log(f"== {side}x{side}, {classes} classes, {kerascam.layers.path_name(ref)} (K = {k}), {keras.backend.backend()}")
    for name, s in seconds.items():
        log(f"  {name:17s} {s * 1000:9.1f} ms per 256 -> {B / s:10.1f} pictures/s = {B / s / t:6.2f} x T")

    images = rng.uniform(0, 255, (n, side, side, 3)).astype(np.float32)
    call = lambda: kerascam.score_cam_layers(model, images, [ref], batch_size=B, precision="float32")  # noqa: E731
    call()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    call()
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    compiled = sum(ct for (_, _, fn), (_, _, _, ct, _) in stats.items() if fn == "predict_on_batch")
    passes = n * (k + 1)
    log(f"  score_cam, {n} pictures: {total:.2f} s, {passes / total:.1f} passes/s = {passes / total / t:.2f} x T "
        f"(the bound); {compiled / total:.1%} of the call in Keras's predict_on_batch (the compiled steps and "
        f"their results), {1 - compiled / total:.1%} the Python around them")


def main(p, args):
    if args.n < 1:
        p.error("--n must be at least 1")
    sizes = {"32": (32, 10), "64": (64, 20)}
    chosen = [s.strip() for s in args.sizes.split(",") if s.strip() in sizes]
    if not chosen:
        p.error("--profile takes --sizes 32, 64 or both")
    for s in chosen:
        profile_size(*sizes[s], min(args.n, 64), args.seed, lambda line: print(line, flush=True))
