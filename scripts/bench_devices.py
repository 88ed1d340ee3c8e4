"""Benchmark: training and extraction images per second by precision, XLA and replicas.

For each backbone (random weights: throughput does not depend on them), every combination of

- precision: float32 against mixed precision (mixed_float16 on a GPU, mixed_bfloat16 on a CPU,
  where float16 has no fast kernels),
- XLA: `--jit-compile off` against `on` (on one device: over several replicas a run turns it off),
- replicas: one device against mirrored over N (every GPU; on a CPU, N logical devices),

measures images per second of (a) feature extraction (the frozen backbone's forward pass,
through `kerastl.features.extract`, each replica taking its share of the batch; 32 batches in
one call, as a run extracts) and (b) a
training step of the whole network (`fit`, as phase 2 or training from scratch runs it), after
a warm-up call that traces and compiles. Ratios are against float32, XLA off, one device,
measured in the same run. Synthetic 0-255 images at the given size.

Each combination runs in its own process, so a strategy, a dtype policy and XLA's caches do not
carry over, and the CPU is split into logical devices before TensorFlow starts.

    python scripts/bench_devices.py                    # a GPU machine: MobileNetV2 and ResNet50, 224 px
    python scripts/bench_devices.py --quick            # a CPU: MobileNetV2 at 96 px, 2 logical devices (CI)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(backbone: str, size: int, batch: int, steps: int, precision: str, jit: str, replicas: int,
            logical_cpus: int, extraction_batches: int = 32) -> dict:
    """One combination, in this process: images per second of extraction and of training."""
    import tensorflow as tf

    if logical_cpus > 1 and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    from kerastl.config import ModelConfig, TrainConfig
    from kerastl.devices import DeviceConfig
    from kerastl.features.extract import extract
    from kerastl.models.classifier import build_classifier
    from kerastl.training.compile import compile_classifier
    from kerastl.training.distribute import plan_devices

    devices = plan_devices(DeviceConfig("mirrored" if replicas > 1 else "one", precision, jit), batch)
    rng = tf.random.Generator.from_seed(0)
    images = tf.cast(rng.uniform((batch * 4, size, size, 3), 0, 255, dtype=tf.int32), tf.float32)
    labels = rng.uniform((batch * 4,), 0, 10, dtype=tf.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True).cache()
    with devices.scope():
        model = build_classifier(ModelConfig(backbone, weights=None, image_size=size, from_scratch=True), 10)
        features = model.features_model()
        features.compile(jit_compile=devices.jit_compile)  # XLA for one device's predict (mirrored: not jitted)
        extract(features, data.take(1))  # traces (one device: the predict function kept for the timed call)
        start = time.perf_counter()  # one call over many batches, as a run extracts (mirrored: traces once in it)
        rows = len(extract(features, data.repeat(extraction_batches // 4))[1])
        extraction = rows / (time.perf_counter() - start)
        compile_classifier(model, TrainConfig(), jit_compile=devices.jit_compile)
        model.fit(data.repeat(), steps_per_epoch=2, epochs=1, verbose=0)  # traces (and compiles, with XLA)
        start = time.perf_counter()
        model.fit(data.repeat(), steps_per_epoch=steps, epochs=1, verbose=0)
        training = steps * batch / (time.perf_counter() - start)
    return {"backbone": backbone, "precision": devices.precision, "xla": devices.xla,
            "replicas": devices.replicas, "extraction": extraction, "training": training,
            "device": devices.devices[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 at 96 px, 2 logical CPUs, few steps")
    parser.add_argument("--backbones", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps timed per combination")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a combination, as JSON, for a child process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(**json.loads(args.one))))
        return
    backbones = args.backbones or (["mobilenet_v2"] if args.quick else ["mobilenet_v2", "resnet50"])
    size = args.size or (96 if args.quick else 224)
    batch = args.batch_size or (16 if args.quick else 64)
    steps = args.steps or (12 if args.quick else 30)
    probe = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(len("
                            "tf.config.list_physical_devices('GPU')))"], capture_output=True, text=True)
    gpus = int(probe.stdout.strip().splitlines()[-1])
    mixed, many = ("mixed_float16", gpus) if gpus else ("mixed_bfloat16", 2)
    rows = []
    combinations = [(backbone, precision, jit, replicas) for backbone, precision, jit, replicas in itertools.product(
        backbones, ("float32", mixed), ("off", "on"), (1, many) if many > 1 else (1,)) if jit == "off" or replicas == 1]
    for backbone, precision, jit, replicas in combinations:
        one = {"backbone": backbone, "size": size, "batch": batch, "steps": steps, "precision": precision,
               "jit": jit, "replicas": replicas, "logical_cpus": 0 if gpus else 2}
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not found:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{backbone} {precision} XLA {jit} x{replicas}: failed ({tail})", flush=True)
            continue
        rows.append(json.loads(found[0][len("RESULT "):]))
        print(f"{backbone} {precision} XLA {jit} x{replicas}: done", file=sys.stderr, flush=True)
    print(f"\n{size} px, global batch {batch}, {steps} training steps timed, on "
          f"{f'{gpus} GPU(s)' if gpus else '2 logical devices of one CPU'}\n")
    print("| backbone | precision | XLA | replicas | extraction img/s | x | training img/s | x |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["backbone"] == row["backbone"] and r["precision"] == "float32"
                     and not r["xla"] and r["replicas"] == 1), None)
        if base is None:  # the baseline failed (its line above says why): no ratios for this backbone
            base = {"extraction": float("nan"), "training": float("nan")}
        print(f"| {row['backbone']} | {row['precision']} | {'on' if row['xla'] else 'off'} | {row['replicas']} | "
              f"{row['extraction']:.1f} | {row['extraction'] / base['extraction']:.2f} | {row['training']:.1f} | "
              f"{row['training'] / base['training']:.2f} |")


if __name__ == "__main__":
    main()
