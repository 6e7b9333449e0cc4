"""What a test reads a console by: the lines that only Ray's and TensorFlow's internals print."""
from __future__ import annotations

import re

# Ray's actor and worker prefixes and its own processes, TensorFlow's C++ (glog/absl) lines and
# its start-up notices.
ENGINE_INTERNALS = re.compile(
    r"\((RayTrainWorker|TrainController|PlacementGroupCleaner|\w+) pid=\d+\)|PlacementGroupCleaner|"
    r"Started a local Ray instance|^[IWEF]\d{4} \d\d:\d\d:\d\d|cuInit|oneDNN|cudart_stub|cpu_feature_guard|"
    r"absl::InitializeLog"
)
