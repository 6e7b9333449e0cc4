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

from typing import Callable

import tensorflow as tf

from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.records import parse_sequence_example
from trainer.ops import caption_to_sequences

RESIZE_RATIO = 346 / 299  # im2txt resizes to 346x346 before cropping 299x299

# im2txt's distort_image: colour changes, in [0, 1] pixel units.
BRIGHTNESS_MAX_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
HUE_MAX_DELTA = 0.032
CONTRAST_RANGE = (0.5, 1.5)


def shard_files(data_dir: str, split: str) -> list[str]:
    """The split's shards under `data_dir`, sorted: a local path, or any URL TensorFlow's file
    systems read (gs:// is built in; s3:// needs the tensorflow-io package)."""
    pattern = join_url(data_dir, f"{split}-?????-of-?????")
    try:
        files = sorted(tf.io.gfile.glob(pattern))
    except tf.errors.UnimplementedError as error:
        raise ShowtellError(f"cannot list {pattern}: {error.message}") from None
    if not files:
        raise ShowtellError(f"no {split} shards match {pattern}: run `showtell preprocess` first")
    return files


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


# XLA fuses the dozen element-wise passes into one: about 0.4 ms a 299x299 image on one core
# instead of 1.5 (measured beside the uncompiled ops).
@tf.function(jit_compile=True)
def distort_colours(image: tf.Tensor) -> tf.Tensor:
    """im2txt's random colour distortion of a [H, W, 3] image in [0, 1], clipped back to [0, 1]:
    brightness, then saturation and hue, and contrast either after or before those two.

    im2txt picks one of the two orders by preprocessing thread; here each image draws one.
    """
    saturation_factor = tf.random.uniform([], *SATURATION_RANGE)
    hue_delta = tf.random.uniform([], -HUE_MAX_DELTA, HUE_MAX_DELTA)
    image = tf.image.random_brightness(image, BRIGHTNESS_MAX_DELTA)
    contrast_last = tf.random.uniform([]) < 0.5
    image = tf.cond(contrast_last, lambda: image, lambda: tf.image.random_contrast(image, *CONTRAST_RANGE))
    image = adjust_saturation_and_hue(image, saturation_factor, hue_delta)
    image = tf.cond(contrast_last, lambda: tf.image.random_contrast(image, *CONTRAST_RANGE), lambda: image)
    return tf.clip_by_value(image, 0.0, 1.0)


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


def preprocess_image(image_bytes: tf.Tensor, image_size: int, training: bool, random_flip: bool = True) -> tf.Tensor:
    """Encoded image (JPEG, or PNG/GIF/BMP) -> float32 [image_size, image_size, 3] in [-1, 1], as
    im2txt's process_image: resize to `resize_size(image_size)` squared (bilinear), then a random
    crop, a random left-right flip (unless `random_flip` is False) and colour distortion when
    training, the central crop when not.

    Training takes the crop first, in source pixels (`crop_window`), and decodes and resizes only
    that: the same crop up to a sub-pixel shift (window edges fall on whole source pixels), which
    as augmentation is noise beside the crop's own randomness, for a quarter less work on the
    input pipeline's hot path. Evaluation resizes the whole image, exactly as im2txt.
    """
    slack = resize_size(image_size) - image_size  # crops start at 0..47 for 299
    if training:
        offset = tf.random.uniform([2], 0, slack + 1, dtype=tf.int32)
        window = decode_window(image_bytes, lambda shape: crop_window(shape, image_size, offset))
        # Resizing uint8 gives float32 in [0, 255]: one pass fewer than converting first.
        image = tf.image.resize(window, [image_size, image_size]) / 255.0
        if random_flip:
            image = tf.image.random_flip_left_right(image)
        image = distort_colours(image)
    else:
        resized = resize_size(image_size)
        image = tf.image.resize(tf.io.decode_jpeg(image_bytes, channels=3), [resized, resized]) / 255.0
        image = tf.image.crop_to_bounding_box(image, slack // 2, slack // 2, image_size, image_size)
    return (image - 0.5) * 2.0


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
    """
    repeat = training if repeat is None else repeat
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    shard_by_file = len(files) >= num_pipelines

    file_names = tf.data.Dataset.from_tensor_slices(list(files))
    if shard_by_file:
        file_names = file_names.shard(num_pipelines, pipeline_id)
    if training:
        file_names = file_names.shuffle(len(files), seed=seed)

    def read_file(file_name: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(file_name)
        return records if shard_by_file else records.shard(num_pipelines, pipeline_id)

    records = file_names.interleave(read_file, num_parallel_calls=tf.data.AUTOTUNE)
    if training and shuffle_buffer > 0:
        records = records.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        records = records.repeat()

    def to_example(serialized: tf.Tensor):
        _, jpeg, caption_ids = parse_sequence_example(serialized)
        input_seq, target_seq, mask = caption_to_sequences(caption_ids)
        return (
            {"images": preprocess_image(jpeg, image_size, training, random_flip), "input_seqs": input_seq},
            target_seq,
            mask,
        )

    examples = records.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    batches = examples.padded_batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = not training  # training: take whichever element is ready first
    options.threading.max_intra_op_parallelism = 1  # images in parallel, not each op: faster (measured)
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)
