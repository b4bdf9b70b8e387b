"""GPU extraction throughput: images/s of `sail extract` for a dinov2-large-shaped random model (from a config).

    python benchmarks/gpu_extract.py                          # cuda: forward per dtype, then the whole pipeline
    python benchmarks/gpu_extract.py --device cpu --quick     # smoke run of the same code on CPU (tiny numbers)

`bench_extract()` is the extraction section of benchmarks/gpu.py, which imports it from here.

What is measured (sail.encoders.tiny's "dinov2-l" shape: hidden 1024, 24 layers, 16 heads, patch 14, 224 px crop):
- forward, per weights dtype (fp32, and the precision policy's dtype: bf16 on Ampere+): ImageEncoder.encode_pixels
  on (B, 3, 224, 224) uint8 batches in pinned host memory, as the DataLoader hands them over: copy to the
  device, normalise there, forward, [CLS; mean patch] pooling in fp32, fp16 features back to the host.
  B = the default batch for the model's size (sail.encoders.default_batch_size) unless --batch.
- pipeline: sail.encoders.extract.extract end to end (default workers, --preprocess fast, the policy's dtype) on
  --images JPEG photos of 500x375 (crops of grace_hopper.jpg), model load excluded, once with --decode cpu
  (workers decode with PIL) and once with --decode gpu (workers read bytes; nvImageCodec decodes, torch resizes
  and crops on the GPU; sail.data.gpu_decode) where it can run (else why not is recorded); img/s of each and
  the ratio to the forward in the same dtype (`pipeline_over_forward`: the path --decode auto takes). Below 1
  the decoding, not the forward, sets the pace. Up to 1024 distinct photos are listed again under new ids up
  to --images rows (each row is decoded): with 4096 rows and 15 workers on an H200, each worker decoded about
  one 512-image batch, so the ramp-up set the figure.
- agreement: the two pipelines' stores row by row: the largest absolute difference of the fp16 features, and
  the lowest and mean cosine of the rows centred on the CPU store's mean (raw features of a random model all
  point alike). --quick on CPU runs the GPU path's code with nvImageCodec's CPU backend.
Prints a table, then one JSON line.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_img_s(encoder, batch: int, steps: int) -> float:
    """Images/s of encode_pixels on pinned uint8 batches (host -> device copy, normalise, forward, pool, D2H)."""
    pixels = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    if encoder.device.type == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(2):  # warm-up: kernels chosen, allocator primed
        encoder.encode_pixels(pixels)[0].to(torch.float16).cpu()
    _sync(encoder.device)
    t = time.perf_counter()
    for _ in range(steps):
        encoder.encode_pixels(pixels)[0].to(torch.float16).cpu()  # the .cpu() syncs, as extract's does
    return batch * steps / (time.perf_counter() - t)


def bench_extract(device: str = "cuda", images: int = 51200, batch: int | None = None, steps: int = 10,
                  quick: bool = False) -> dict:
    """The extraction figures as a dict; prints its table as it goes."""
    from extract import make_photos
    from transformers.utils import logging as hf_logging

    from sail.core.precision import resolve_precision
    from sail.encoders import ImageEncoder, default_batch_size, num_params, resolve_model
    import sail.encoders.extract as ex
    from sail.encoders.tiny import make_vision_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    policy = resolve_precision("auto", dev)
    shape = "tiny" if quick else "dinov2-l"
    tmp = Path(tempfile.mkdtemp(prefix="sail-bench-gpu-extract-"))
    os.environ.setdefault("SAIL_CACHE", str(tmp / "cache"))
    result = {"benchmark": "gpu_extract", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "model": f"{shape} shape, random", "policy": policy.name}
    try:
        model_dir = make_vision_model(tmp / "model", shape=shape)
        spec = resolve_model(str(model_dir))
        dtypes = {"fp32": torch.float32}
        dtypes[policy.name] = policy.dtype
        print(f"extraction, {shape} shape ({'random' if not quick else 'smoke'}), {result['device']}, policy {policy}")
        print(f"  {'run':<28} {'batch':>6} {'img/s':>9}")
        for name, dtype in dtypes.items():
            enc = ImageEncoder(spec, dev, "concat", dtype, "fast")
            b = batch or default_batch_size(num_params(enc.model), dev)
            result["params"] = num_params(enc.model)
            result[f"forward_{name}_img_s"] = forward_img_s(enc, b, 2 if quick else steps)
            result[f"forward_{name}_batch"] = b
            print(f"  {'forward ' + name:<28} {b:>6} {result[f'forward_{name}_img_s']:>9.1f}", flush=True)
            del enc
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        n = 64 if quick else images
        # up to 1024 distinct photos, listed again under new ids up to n rows: every row is still decoded,
        # and n can be large enough for the workers' ramp-up (a batch each) not to set the figure
        files = make_photos(tmp / "photos", min(n, 1024))
        (tmp / "m.csv").write_text("id,image\n" + "".join(f"r{i:07d},{files[i % len(files)]}\n" for i in range(n)))
        timed = {"load": 0.0}
        load = ex.load_encoder

        def load_timed(*a, **k):
            t = time.perf_counter()
            try:
                return load(*a, **k)
            finally:
                timed["load"] += time.perf_counter() - t

        ex.load_encoder = load_timed
        result["pipeline_images"] = n
        result["workers"] = ex.default_workers()
        forward = result[f"forward_{policy.name}_img_s"]
        from sail.core.errors import SailError

        try:
            for decode in ("cpu", "gpu"):
                with _cpu_backend() if dev.type == "cpu" and decode == "gpu" else contextlib.nullcontext():
                    cfg = ex.ExtractConfig(model=str(model_dir), data=str(tmp / "m.csv"), out=str(tmp / f"{decode}.h5"),
                                           device=device, batch_size=batch, progress=False, decode=decode)
                    timed["load"] = 0.0
                    t = time.perf_counter()
                    try:
                        res = ex.extract(cfg)
                    except SailError as e:  # --decode gpu that cannot run here says why before writing anything
                        if decode != "gpu" or not str(e).startswith("--decode gpu cannot run here: "):
                            raise
                        why_not = str(e)[len("--decode gpu cannot run here: "):].removesuffix("; use --decode cpu")
                        result["decode_gpu_unavailable"] = why_not
                        print(f"  pipeline, --decode gpu: not run ({why_not})")
                        break
                    seconds = time.perf_counter() - t - timed["load"]
                if res.skipped:
                    raise RuntimeError(f"pipeline (--decode {decode}) skipped images: {res.skipped}")
                result[f"pipeline_{decode}_img_s"] = n / seconds
                result[f"pipeline_{decode}_over_forward"] = n / seconds / forward
                print(f"  {f'pipeline, --decode {decode}':<28} {'auto':>6} {n / seconds:>9.1f}   "
                      f"{n / seconds / forward:.2f} x forward {policy.name}", flush=True)
        finally:
            ex.load_encoder = load
        auto = "gpu" if "pipeline_gpu_img_s" in result and dev.type == "cuda" else "cpu"
        result["pipeline_decode"] = auto
        result["pipeline_img_s"] = result[f"pipeline_{auto}_img_s"]
        result["pipeline_over_forward"] = result[f"pipeline_{auto}_over_forward"]
        if "pipeline_gpu_img_s" in result:
            result.update(_agreement(tmp / "cpu.h5", tmp / "gpu.h5"))
            print(f"  gpu vs cpu decoding: features max |diff| {result['gpu_vs_cpu_max_abs_diff']:.3g}, "
                  f"centred cosine min {result['gpu_vs_cpu_cos_min']:.4f}, mean {result['gpu_vs_cpu_cos_mean']:.5f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@contextlib.contextmanager
def _cpu_backend():
    """--quick on CPU: --decode gpu runs sail.data.gpu_decode with nvImageCodec's CPU backend (a smoke run of the code)."""
    from sail.data import gpu_decode

    real = gpu_decode.open_decoder
    gpu_decode.open_decoder = lambda fast, device: (gpu_decode.GpuDecoder(fast, torch.device("cpu")), None)
    try:
        yield
    finally:
        gpu_decode.open_decoder = real


def _agreement(cpu_store: Path, gpu_store: Path) -> dict:
    """The two decodings' features row by row: max |diff|, and the cosine of rows centred on the CPU store's mean."""
    import numpy as np

    from sail.data.store import FeatureStore

    with FeatureStore(cpu_store) as a, FeatureStore(gpu_store) as b:
        x, y = a.read("image").astype(np.float32), b.read("image").astype(np.float32)
    mean = x.mean(0)
    xc, yc = x - mean, y - mean
    cos = (xc * yc).sum(1) / np.linalg.norm(xc, axis=1) / np.linalg.norm(yc, axis=1)
    return {"gpu_vs_cpu_max_abs_diff": float(np.abs(x - y).max()), "gpu_vs_cpu_cos_min": float(cos.min()),
            "gpu_vs_cpu_cos_mean": float(cos.mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=51200, help="JPEG rows for the pipeline runs")
    p.add_argument("--batch", type=int, default=None, help="default: from the model's size")
    p.add_argument("--steps", type=int, default=10, help="timed forward batches per dtype")
    p.add_argument("--quick", action="store_true", help="tiny model, few images: a smoke run")
    args = p.parse_args(argv)
    result = bench_extract(args.device, args.images, args.batch, args.steps, args.quick)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
