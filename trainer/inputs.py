"""The training and evaluation input pipeline: im2txt's records -> padded batches (tf.data).

    files = shard_files(config.data_dir, "train")
    dataset = make_dataset(files, image_size=299, batch_size=32, training=True)
    features, target_seqs, mask = next(iter(dataset))
    # features["images"]      float32 [32, 299, 299, 3] in [-1, 1]
    # features["input_seqs"]  int64   [32, T]   T = the longest caption of the batch, minus one
    # target_seqs             int64   [32, T]   input_seqs shifted left by one word
    # mask                    int32   [32, T]   1 for each real word, 0 for padding

Images are processed as im2txt's `process_image` (docs/im2txt.md, "Model"): resized to a square
346/299 times the model's size, then a random crop, flip and colour distortion when training,
the central crop when not.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Optional

import tensorflow as tf

from schemas.config import ShardCache as ShardCacheConfig
from schemas.config import join_url
from schemas.errors import ShowtellError, first_line
from schemas.feature_records import parse_feature_example
from schemas.records import parse_sequence_example
from schemas.storage import absolute, fresh_fs, is_local
from trainer import shard_cache
from trainer.ops import caption_to_sequences

RESIZE_RATIO = 346 / 299  # im2txt resizes to 346x346 before cropping 299x299
CYCLE_LENGTH = 4  # shard files read at once, their records interleaved

# im2txt's distort_image: colour changes, in [0, 1] pixel units.
BRIGHTNESS_MAX_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
HUE_MAX_DELTA = 0.032
CONTRAST_RANGE = (0.5, 1.5)


def shard_files(data_dir: str, split: str) -> list[str]:
    """The split's shards under `data_dir`, sorted: local paths (absolute), or URLs of any fsspec
    store (s3://, gs://, memory://, ...), listed through fsspec (TensorFlow's file layer has no s3://)."""
    pattern = join_url(absolute(data_dir), f"{split}-?????-of-?????")
    try:
        fs, path = fresh_fs(pattern)
        found = sorted(fs.glob(path))
    except FileNotFoundError:
        found = []
    except (OSError, ValueError) as error:  # refused credentials, unreachable endpoint, bad bucket name
        raise ShowtellError(f"cannot list {pattern}: {first_line(error)}") from None
    if not found:
        raise ShowtellError(f"no {split} shards match {pattern}: run `showtell preprocess` first")
    return found if is_local(pattern) else [fs.unstrip_protocol(name) for name in found]


def file_order(count: int, *, seed: int, shuffle: bool, repeat: bool) -> Iterator[int]:
    """Indices of `count` files in the order they are read: each epoch a new shuffle (seeded by
    `seed` and the epoch) when `shuffle`, else in order; epoch after epoch when `repeat`."""
    epoch = 0
    while True:
        order = list(range(count))
        if shuffle:
            random.Random(f"{seed}/{epoch}").shuffle(order)
        yield from order
        epoch += 1
        if not repeat:
            return


def resize_size(image_size: int) -> int:
    """The square an image is resized to before cropping `image_size`: 346 for 299."""
    return round(image_size * RESIZE_RATIO)


def adjust_saturation_and_hue(image: tf.Tensor, saturation_factor: tf.Tensor, hue_delta: tf.Tensor) -> tf.Tensor:
    """`tf.image.adjust_hue(tf.image.adjust_saturation(image, saturation_factor), hue_delta)` of a
    [H, W, 3] image in plain element-wise ops: the same pixels (to float rounding), in 0.95 ms
    instead of 1.46 for a 299x299 photograph on one core, 10-15% more training images a second
    (on flat drawings like the sample's, both take 0.95 ms).

    In HSV terms every pixel keeps its value V = max(r, g, b); its chroma C = V - min(r, g, b)
    scales by the factor, capped where saturation C / V would pass 1 and zero where V <= 0 (as
    TF's kernel); its hue H, in sextants [0, 6), moves by 6 * hue_delta. Channel n (5 for red, 3
    for green, 1 for blue) is then V - C * clip(min(k, 4 - k), 0, 1) with k = (n + H) mod 6.
    """
    red, green, blue = tf.unstack(image, axis=-1)
    value = tf.maximum(red, tf.maximum(green, blue))
    chroma = value - tf.minimum(red, tf.minimum(green, blue))
    inverse_chroma = tf.math.divide_no_nan(1.0, chroma)  # 0 for grey pixels, whose hue is 0
    hue_numerator = tf.where(value == red, green - blue, tf.where(value == green, blue - red, red - green))
    hue_sextant = tf.where(value == red, 0.0, tf.where(value == green, 2.0, 4.0))  # of the strongest channel
    hue = hue_numerator * inverse_chroma + hue_sextant + 6.0 * hue_delta
    chroma = tf.where(value > 0.0, chroma * tf.minimum(saturation_factor, value * inverse_chroma), 0.0)
    # k of every channel at once, channels first: TF broadcasts over a leading axis of 3 fast and
    # over a trailing one slowly (as tf.stack on the last axis is slow: one transpose instead).
    sextants = hue + tf.constant([5.0, 3.0, 1.0])[:, tf.newaxis, tf.newaxis]  # [3, H, W]
    sextants -= 6.0 * tf.floor(sextants / 6.0)  # mod 6; tf.math.floormod is slower
    weights = tf.clip_by_value(tf.minimum(sextants, 4.0 - sextants), 0.0, 1.0)
    return tf.transpose(value - chroma * weights, [1, 2, 0])


class RandomDraws:
    """The random numbers of one image's augmentation: from TF's stateful random ops (training
    from images), or, given `seed` (int [2]), from stateless ones, so that the same seed always
    gives the same crop, flip and colours (the feature cache's views)."""

    def __init__(self, seed: Optional[tf.Tensor] = None):
        self._seed = seed
        self._draws = 0

    def uniform(self, shape, minval=0.0, maxval=1.0, dtype=tf.float32) -> tf.Tensor:
        if self._seed is None:
            return tf.random.uniform(shape, minval, maxval, dtype=dtype)
        self._draws += 1  # each draw its own stream of the seed
        seed = tf.random.experimental.stateless_fold_in(self._seed, self._draws)
        return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=dtype)


# XLA fuses the dozen element-wise passes into one: about 0.4 ms a 299x299 image on one core
# instead of 1.5 (measured beside the uncompiled ops).
@tf.function(jit_compile=True)
def distort_colours(image: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
    """im2txt's random colour distortion of a [H, W, 3] image in [0, 1], clipped back to [0, 1]:
    brightness, then saturation and hue, and contrast either after or before those two.

    `draws` is `colour_draws`' [5]: brightness delta, contrast factor, saturation factor, hue
    delta, and whether contrast comes last (>= 0.5). im2txt picks one of the two orders by
    preprocessing thread; here each image draws one.
    """
    brightness_delta, contrast_factor, saturation_factor, hue_delta, order = tf.unstack(draws)
    contrast_last = order >= 0.5
    image = tf.image.adjust_brightness(image, brightness_delta)
    image = tf.cond(contrast_last, lambda: image, lambda: tf.image.adjust_contrast(image, contrast_factor))
    image = adjust_saturation_and_hue(image, saturation_factor, hue_delta)
    image = tf.cond(contrast_last, lambda: tf.image.adjust_contrast(image, contrast_factor), lambda: image)
    return tf.clip_by_value(image, 0.0, 1.0)


def colour_draws(draws: RandomDraws) -> tf.Tensor:
    """float32 [5]: `distort_colours`' random numbers, as im2txt's ranges."""
    return tf.stack(
        [
            draws.uniform([], -BRIGHTNESS_MAX_DELTA, BRIGHTNESS_MAX_DELTA),
            draws.uniform([], *CONTRAST_RANGE),
            draws.uniform([], *SATURATION_RANGE),
            draws.uniform([], -HUE_MAX_DELTA, HUE_MAX_DELTA),
            draws.uniform([]),
        ]
    )


def crop_window(image_shape: tf.Tensor, image_size: int, offset: tf.Tensor) -> tf.Tensor:
    """The pixels of an image that become one `image_size` crop: [top, left, height, width].

    im2txt resizes the whole image to `resize_size(image_size)` squared and crops `image_size`
    squared at `offset` ([y, x] in that resized square). This maps the crop back to the source
    image (`image_shape` [height, width, ...]) so that only the crop is decoded and resized:
    for a 640x480 photograph and 299, a 553x415 window, a quarter of the pixels fewer.
    """
    resized = float(resize_size(image_size))
    source = tf.cast(image_shape[:2], tf.float32)
    top_left = tf.cast(tf.round(tf.cast(offset, tf.float32) * source / resized), tf.int32)
    extent = tf.cast(tf.round(image_size * source / resized), tf.int32)
    extent = tf.maximum(tf.minimum(extent, tf.cast(image_shape[:2], tf.int32) - top_left), 1)
    return tf.concat([top_left, extent], axis=0)


def decode_window(image_bytes: tf.Tensor, window_of: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """uint8 [h, w, 3]: the `window_of(image shape)` part of an encoded image. A JPEG decodes
    only that window (`decode_and_crop_jpeg`); PNG, GIF and BMP, which records may also hold
    (pipelines/images.py keeps whatever `decode_jpeg` reads), decode whole and are then cut."""

    def jpeg() -> tf.Tensor:
        return tf.io.decode_and_crop_jpeg(image_bytes, window_of(tf.io.extract_jpeg_shape(image_bytes)), channels=3)

    def other() -> tf.Tensor:
        image = tf.io.decode_jpeg(image_bytes, channels=3)
        top, left, height, width = tf.unstack(window_of(tf.shape(image)))
        return image[top : top + height, left : left + width]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def preprocess_image(
    image_bytes: tf.Tensor,
    image_size: int,
    training: bool,
    random_flip: bool = True,
    seed: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Encoded image (JPEG, or PNG/GIF/BMP) -> float32 [image_size, image_size, 3] in [-1, 1], as
    im2txt's process_image: resize to `resize_size(image_size)` squared (bilinear), then a random
    crop, a random left-right flip (unless `random_flip` is False) and colour distortion when
    training, the central crop when not. With `seed` (int [2]) the training augmentation is drawn
    from it (`RandomDraws`): the same seed, the same image.

    Training takes the crop first, in source pixels (`crop_window`), and decodes and resizes only
    that: the same crop up to a sub-pixel shift (window edges fall on whole source pixels), which
    as augmentation is noise beside the crop's own randomness, for a quarter less work on the
    input pipeline's hot path. Evaluation resizes the whole image, exactly as im2txt.
    """
    slack = resize_size(image_size) - image_size  # crops start at 0..47 for 299
    if training:
        draws = RandomDraws(seed)
        offset = draws.uniform([2], 0, slack + 1, dtype=tf.int32)
        flip = draws.uniform([]) < 0.5
        colours = colour_draws(draws)
        window = decode_window(image_bytes, lambda shape: crop_window(shape, image_size, offset))
        # Resizing uint8 gives float32 in [0, 255]: one pass fewer than converting first.
        image = tf.image.resize(window, [image_size, image_size]) / 255.0
        if random_flip:
            image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
        image = distort_colours(image, colours)
    else:
        resized = resize_size(image_size)
        image = tf.image.resize(tf.io.decode_jpeg(image_bytes, channels=3), [resized, resized]) / 255.0
        image = tf.image.crop_to_bounding_box(image, slack // 2, slack // 2, image_size, image_size)
    return (image - 0.5) * 2.0


def image_views(image_bytes: tf.Tensor, image_size: int, views: int, seed: tf.Tensor, random_flip: bool) -> tf.Tensor:
    """float32 [views, image_size, image_size, 3]: the feature cache's views of one image, view 0
    its central crop (evaluation's), views 1.. `preprocess_image`'s training augmentation drawn
    from `seed` folded with the view's number:

        image_views(jpeg, 299, views=4, seed=[0, image_id], random_flip=True)   # [4, 299, 299, 3]
    """
    fold_in = tf.random.experimental.stateless_fold_in
    augmented = [
        preprocess_image(image_bytes, image_size, True, random_flip, fold_in(seed, view)) for view in range(1, views)
    ]
    return tf.stack([preprocess_image(image_bytes, image_size, False), *augmented])


def read_records(
    files: list[str],
    *,
    training: bool,
    seed: int = 0,
    repeat: bool = False,
    input_context: Optional[tf.distribute.InputContext] = None,
    cache: Optional[ShardCacheConfig] = None,
) -> tf.data.Dataset:
    """The serialized records of this input pipeline's share of `files`, as `make_dataset` reads them.

    Files are read `CYCLE_LENGTH` at a time, their records interleaved, in `file_order` (shuffled
    per epoch by `seed` when `training`; epoch after epoch when `repeat`). Local files are read in
    place. Files on any other store (s3://, gs://, ...) go through a `trainer.shard_cache.ShardCache`
    (`cache`; default: `train.shard_cache`'s defaults): each is downloaded to local disk ahead of
    its turn and deleted once read to its end, so the same records come out in the same order.
    """
    cache = cache or ShardCacheConfig()
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    shard_by_file = len(files) >= num_pipelines
    mine = list(files)[pipeline_id::num_pipelines] if shard_by_file else list(files)
    cycle = max(1, min(CYCLE_LENGTH, len(mine)))
    cached = not shard_cache.all_local(mine)
    if cached:
        shards = shard_cache.stat_shards(mine)  # one line naming a missing shard or unreadable folder, now
        shard_cache.check_bound(shards, cache.max_bytes, cycle)
    else:
        local_paths = [absolute(url) for url in mine]

    def local_files() -> Iterator[str]:
        yield from (local_paths[i] for i in file_order(len(mine), seed=seed, shuffle=training, repeat=repeat))

    def cached_files() -> Iterator[tuple[str, int]]:
        # (the cache's folder, the file's number in the order read): a new cache per iteration,
        # which downloads the files in that order; each is waited for inside the interleave's
        # element that reads it (`read_cached_file`), never here.
        order = file_order(len(mine), seed=seed, shuffle=training, repeat=repeat)
        reader = shard_cache.ShardCache((shards[i] for i in order), cache.folder, cache.max_bytes)
        try:
            number = 0
            for _ in file_order(len(mine), seed=seed, shuffle=training, repeat=repeat):
                yield reader.folder, number
                number += 1
        except BaseException:  # GeneratorExit: the iterator was dropped before the end
            reader.close()
            raise
        reader.close_when_read()  # the last files are still being read

    def read_file(path: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(path)
        return records if shard_by_file else records.shard(num_pipelines, pipeline_id)

    if not cached:
        names = tf.data.Dataset.from_generator(local_files, output_signature=tf.TensorSpec([], tf.string))
        return names.interleave(read_file, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE)

    def wait_path(folder: tf.Tensor, number: tf.Tensor) -> tf.Tensor:
        wait = lambda f, n: shard_cache.wait_path(f.numpy(), int(n))  # noqa: E731
        return tf.reshape(tf.py_function(wait, [folder, number], tf.string), [])

    def read_downloaded(path: tf.Tensor) -> tf.data.Dataset:
        # Each record with "", then the file's path once it has been read to its end: the marker
        # that releases (deletes) the cached file.
        end = tf.data.Dataset.from_tensors((tf.constant(b""), path))
        return read_file(path).map(lambda record: (record, tf.constant(b""))).concatenate(end)

    def read_cached_file(folder: tf.Tensor, number: tf.Tensor) -> tf.data.Dataset:
        # The wait runs when the interleave's element is first read (a map inside it), not when
        # the element is made.
        return tf.data.Dataset.from_tensors((folder, number)).map(wait_path).flat_map(read_downloaded)

    signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64))
    numbered = tf.data.Dataset.from_generator(cached_files, output_signature=signature)
    # A sequential interleave: its elements are opened in turn as the records are pulled, none
    # ahead (a parallel one starts further files early, which would wait for room held by files
    # it is not reading, forever). The same order as the parallel one's deterministic order.
    records = numbered.interleave(read_cached_file, cycle_length=cycle)

    def not_a_marker(record: tf.Tensor, done: tf.Tensor) -> tf.Tensor:
        def release() -> tf.Tensor:
            return tf.reshape(tf.py_function(lambda path: shard_cache.release_path(path.numpy()), [done], tf.bool), [])

        return tf.cond(tf.strings.length(done) > 0, release, lambda: tf.constant(True))

    return records.filter(not_a_marker).map(lambda record, done: record)


def make_dataset(
    files: list[str],
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 2048,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool | None = None,
    random_flip: bool = True,
    shard_cache_config: Optional[ShardCacheConfig] = None,
) -> tf.data.Dataset:
    """Batches of ({"images", "input_seqs"}, target_seqs, mask) from im2txt's record files.

    `batch_size` is this input pipeline's batch (one worker's). With `input_context` (from
    `strategy.distribute_datasets_from_function`) each pipeline reads its own part: whole files
    when there are at least as many files as pipelines, else every n-th record of each file.
    Training shuffles files and records (seeded by `seed`), repeats forever unless `repeat` is
    False, drops the last partial batch (every replica steps on equal batches) and gives up
    element order for speed; evaluation reads each record once, in order, by default.
    Captions are padded with zeros to the longest of their batch. `random_flip` False keeps
    training images unmirrored, for captions that say which side a thing is on.
    `files` may be local paths or URLs of any fsspec store (`read_records`).
    """
    repeat = training if repeat is None else repeat
    records = read_records(
        files, training=training, seed=seed, repeat=repeat, input_context=input_context, cache=shard_cache_config
    )
    if training and shuffle_buffer > 0:
        records = records.shuffle(shuffle_buffer, seed=seed)

    def to_example(serialized: tf.Tensor):
        _, jpeg, caption_ids = parse_sequence_example(serialized)
        input_seq, target_seq, mask = caption_to_sequences(caption_ids)
        return (
            {"images": preprocess_image(jpeg, image_size, training, random_flip), "input_seqs": input_seq},
            target_seq,
            mask,
        )

    return _batched(records.map(to_example, num_parallel_calls=tf.data.AUTOTUNE), batch_size, training)


def make_feature_dataset(
    files: list[str],
    *,
    feature_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 2048,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool | None = None,
    shard_cache_config: Optional[ShardCacheConfig] = None,
) -> tf.data.Dataset:
    """`make_dataset` over the feature cache's shards (schemas/feature_records.py): batches of
    ({"features", "input_seqs"}, target_seqs, mask), one example per caption, as from images:

        features["features"]    float32 [32, feature_size]   one view of each caption's image
        features["input_seqs"]  int64   [32, T]              (target_seqs and mask as make_dataset's)

    Each image's record gives one example per caption; each example draws one of the image's views
    at random when `training` (as the worker seeds TensorFlow), and view 0, the central crop, when
    not. Files are read, shared between input pipelines, shuffled and batched as `make_dataset` does.
    """
    repeat = training if repeat is None else repeat
    records = read_records(
        files, training=training, seed=seed, repeat=repeat, input_context=input_context, cache=shard_cache_config
    )

    def captions_of(serialized: tf.Tensor) -> tf.data.Dataset:
        _, views, captions = parse_feature_example(serialized, feature_size)
        count = captions.nrows()
        if training:
            chosen = tf.random.uniform([count], 0, tf.shape(views, out_type=tf.int64)[0], dtype=tf.int64)
        else:
            chosen = tf.zeros([count], tf.int64)
        return tf.data.Dataset.from_tensor_slices((tf.gather(views, chosen), captions))

    examples = records.flat_map(captions_of)
    if training and shuffle_buffer > 0:  # after flat_map: an image's captions part ways
        examples = examples.shuffle(shuffle_buffer, seed=seed)

    def to_example(features: tf.Tensor, caption_ids: tf.Tensor):
        input_seq, target_seq, mask = caption_to_sequences(caption_ids)
        return {"features": features, "input_seqs": input_seq}, target_seq, mask

    return _batched(examples.map(to_example, num_parallel_calls=tf.data.AUTOTUNE), batch_size, training)


def _batched(examples: tf.data.Dataset, batch_size: int, training: bool) -> tf.data.Dataset:
    """Padded batches of (features, target_seqs, mask) examples, prefetched: training drops the
    last partial batch and takes whichever element is ready first."""
    batches = examples.padded_batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = not training  # training: take whichever element is ready first
    options.threading.max_intra_op_parallelism = 1  # images in parallel, not each op: faster (measured)
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)
