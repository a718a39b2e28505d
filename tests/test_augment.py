"""Training batches: crop+flip against a brute-force definition, and the per-epoch shuffle."""
import numpy as np

import train
from data.augment import crop_flip, rotate_shift_flip


def all_crops(image, pad=4):
    """Every crop of the reflect-padded image, plain and mirrored: what crop_flip may return."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    crops = [padded[y:y + h, x:x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return crops + [c[:, ::-1] for c in crops]


def test_crop_flip_returns_a_padded_crop_of_each_image_in_both_orientations():
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), np.uint8)
    out = crop_flip(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    chosen = []
    for image, result in zip(images, out):
        matches = [k for k, crop in enumerate(all_crops(image)) if np.array_equal(crop, result)]
        assert matches, "not a crop of the padded image"
        chosen.append(matches[0])
    assert len({k >= 81 for k in chosen}) == 2, "never or always flipped"
    assert len({k % 81 for k in chosen}) > 20, "the offsets do not vary"
    assert np.array_equal(crop_flip(images, np.random.default_rng(1)), out)  # a pure function of the generator


def test_rotate_shift_flip_keeps_shape_and_is_a_pure_function_of_the_generator():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
    a, b = (rotate_shift_flip(images, np.random.default_rng(7)) for _ in range(2))
    assert a.shape == images.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, images)


def test_each_epoch_is_a_new_permutation_of_every_image():
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=-1)
    batches = train.EpochBatches(x, np.arange(10) % 2, 2, batch_size=4, seed=0)
    epochs = []
    for _ in range(3):
        batches.on_epoch_end()  # Keras calls it before each pass
        seen = np.concatenate([batches[i][0][:, 0, 0, 0] for i in range(len(batches))]).astype(int)
        assert sorted(seen) == list(range(10)) and len(batches) == 3
        epochs.append(list(seen))
    assert epochs[0] != epochs[1] != epochs[2]
    batches.epoch = 1  # a resumed run sets the counter: it sees that epoch's order again
    assert list(batches[0][0][:, 0, 0, 0].astype(int)) == epochs[0][:4]
