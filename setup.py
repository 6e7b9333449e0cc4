"""showtell: Show and Tell (im2txt) as a scalable Beam + Ray Train pipeline."""
from setuptools import find_packages, setup

setup(
    name="showtell",
    version="0.1.0",
    description="Google's Show and Tell image captioner as a Beam + tf.Transform + Ray Train pipeline",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["pipelines*", "trainer*", "inference*", "orchestration*", "schemas*"]),
    package_data={"schemas": ["*.pbtxt"], "inference": ["*.html"], "": ["*.yaml"]},  # html: `showtell serve`'s page
    install_requires=[
        # The user's chosen stack.
        "apache-beam>=2.60",
        "tensorflow>=2.16",
        "tensorflow-transform>=1.16",
        "ray[train,serve]>=2.40",  # Ray Train for training; Ray Serve for `showtell serve`, the HTTP endpoint
        "pyarrow>=14",
        "fsspec>=2024.2",
        # Supporting libraries.
        "aiohttp>=3.9",  # fsspec's http(s):// filesystem
        "google-crc32c>=1.5",  # TFRecord framing checksums
        "nltk>=3.8",  # im2txt's tokenizer
        "pillow>=10",  # image header checks, sample data, re-encoding unreadable JPEGs
        "pydantic>=2.5",  # typed config schema
        "pyyaml>=6",
        "tqdm>=4.66",  # progress bars on a terminal
        "pycocoevalcap>=1.2",  # COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr; Java for METEOR and tokenizing)
    ],
    extras_require={
        # The tests compile a Kubeflow pipeline, serve S3 (moto) and GCS (gcp-storage-emulator) on
        # 127.0.0.1 for s3fs, gcsfs and pyarrow; `make test` lints with ruff first.
        # Why the store clients carry a lower bound: s3fs >= 2023 needs aiobotocore, which pins botocore
        # to a narrow range (aiobotocore 3.10: botocore <1.43.118), while moto pulls boto3 unpinned. Left
        # unpinned, pip takes the newest boto3/botocore first and backtracks s3fs to 0.4.2 (2019), which
        # needs no aiobotocore. `s3fs>=2025.1` makes pip pick a boto3 that aiobotocore accepts instead.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "kfp>=2.7",
            "moto[server]>=5",
            "s3fs>=2025.1",
            "gcsfs>=2025.1",
            "gcp-storage-emulator>=2024.8",
            "ruff>=0.6",
        ],
        "gcs": ["gcsfs>=2025.1"],
        "s3": ["s3fs>=2025.1"],
        "kfp": ["kfp>=2.7"],  # showtell export-pipeline kfp
    },
    entry_points={"console_scripts": ["showtell=orchestration.cli:main"]},
)
