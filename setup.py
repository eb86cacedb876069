"""mm1_jax: MM1-style multimodal LLM pre-training in JAX, from one CPU to TPU pods."""

from setuptools import find_packages, setup

setup(
    name="mm1_jax",
    version="0.1.0",
    description="MM1 multimodal LLM pre-training and few-shot evaluation in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The gin/ tree ships as the data-only package mm1_jax.gin (mm1_jax/gin/ once installed;
    # an editable install maps it to the checkout's gin/): see mm1_jax/gin_files.py.
    packages=[*find_packages(include=["mm1_jax", "mm1_jax.*", "tasks", "tasks.*"]), "mm1_jax.gin"],
    package_dir={"mm1_jax.gin": "gin"},
    package_data={"mm1_jax.data": ["assets/*.model"], "mm1_jax.gin": ["**/*.gin", "**/*.sweep"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "gin-config>=0.5,<0.6",
        "numpy>=1.26",
        "pillow>=10",
        "sentencepiece>=0.2,<0.2.3",  # 0.2.3's generated protos need protobuf >= 7, which apache-beam excludes
        "tqdm>=4.66",
        "matplotlib>=3.7",  # eval report plots
        "safetensors>=0.4",  # mm1-convert reads Hugging Face checkpoints with numpy
        "tokenizers>=0.20,<1",  # Hugging Face tokenizer.json vocabularies (Llama 3, Qwen)
        # Data stack: seqio tasks over TFRecord shards (imported lazily by the trainer).
        "seqio>=0.0.20,<0.1",
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9.9,<5",
        "grain>=0.2.18,<0.3",  # brings array-record: random-access shards
        "pyarrow>=14",  # Parquet rows (OBELICS)
        "apache-beam>=2.77,<3",  # mm1-data build: DirectRunner here, Dataflow at scale
    ],
    extras_require={
        # torch==2.13.0 is the CPU wheel; transformers is only needed by mm1-convert verify.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0,<6",
                 "pycocoevalcap==1.2", "hypothesis>=6",
                 # a Cloud Storage emulator on 127.0.0.1, and fsspec's GCS client that reaches it
                 "gcp-storage-emulator>=2024.1", "gcsfs>=2024.2",
                 "jax[tpu]>=0.10.2,<0.11",  # libtpu: the preflight tests compile for TPU topologies
                 "tokamax==0.0.12"],  # the splash attention kernel (Pallas interprets it on the CPU)
        # libtpu: mm1-aot compiles for TPU topologies on any machine; on TPU VMs, the runtime.
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "tokamax==0.0.12"],
    },
    entry_points={
        "console_scripts": [
            "mm1-train=mm1_jax.console:train",
            "mm1-eval=mm1_jax.console:eval",
            "mm1-params=mm1_jax.console:params",
            "mm1-convert=mm1_jax.console:convert",
            "mm1-data=mm1_jax.console:data",
            "mm1-aot=mm1_jax.console:aot",
            "mm1-probe=mm1_jax.console:probe",
            "mm1-supervised=mm1_jax.console:supervised",
            "mm1-sweep=mm1_jax.console:sweep",
        ],
    },
)
