"""A training phase's TensorBoard scalars: one event per name and report, under `<phase_dir>/tensorboard/`.

Rank 0 writes a row of history.jsonl and the same row's scalars after each report:

    writer = TensorBoardWriter("gs://bucket/run/train/phase1/tensorboard")
    writer.write({"step": 200, "loss": 3.21, "perplexity": 24.8, "learning_rate": 2.0,
                  "examples_per_sec": 51.3, "grad_norm": 4.2, ...})
    -> events `loss`, `perplexity`, `learning_rate`, `examples_per_sec`, `grad_norm` at step 200
       (other keys of the row are not scalars TensorBoard shows)
    writer.close()

Events are written with `tf.summary.write` and the scalars plugin's metadata, which is what
`tf.summary.scalar` writes, without needing the tensorboard package on the workers. TensorFlow
writes local files only, so for an object store the events go to a local folder first and each
`write` copies that folder up.
"""
from __future__ import annotations

import tempfile

from schemas.storage import absolute, is_local


class TensorBoardWriter:
    """Scalars for TensorBoard under `url`; written locally and copied up for object stores."""

    NAMES = ("loss", "perplexity", "learning_rate", "examples_per_sec", "grad_norm")  # the row's keys it writes

    def __init__(self, url: str):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self.url = url
        self._local = url if is_local(url) else tempfile.mkdtemp(prefix="showtell-tb-")
        self._writer = tf.summary.create_file_writer(absolute(self._local))
        plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        self._metadata = summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()

    def write(self, row: dict) -> None:
        """Writes `row[name]` for each of `NAMES` at step `row["step"]`, then flushes (and uploads)."""
        import tensorflow as tf

        with self._writer.as_default():
            for name in self.NAMES:
                tf.summary.write(name, tf.constant(row[name], tf.float32), step=row["step"], metadata=self._metadata)
        self._writer.flush()
        if self._local != self.url:
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.url)
            fs.put(self._local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)

    def close(self) -> None:
        self._writer.close()
