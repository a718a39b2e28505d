"""Things built from a model (the explainable graph, a compiled step, a bfloat16 copy), built once
per model and reused, so that they are traced and compiled once, not on every call."""
import collections

_CACHE_MODELS = 4
_cache = collections.OrderedDict()  # id(model) -> (model, {key: derived}), the most recent few


def derived(model, key, build):
    """build() for (model, key), built once and kept for the few most recently used models."""
    entry = _cache.get(id(model))
    if entry is None or entry[0] is not model:
        entry = _cache[id(model)] = (model, {})
    _cache.move_to_end(id(model))
    while len(_cache) > _CACHE_MODELS:
        _cache.popitem(last=False)
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]
