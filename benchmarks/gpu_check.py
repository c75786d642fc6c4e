"""Everything one GPU run can tell about the kernels and the models, written as JSON and Markdown.

    python benchmarks/gpu_check.py --out DIR [--smoke]

Run by ``scripts/gpu_check.sh`` (which first builds the extension for the device
and runs the GPU tests). Sections, each timed and recorded even when another fails:

* ``environment``: device, versions, the native build and whether it has code for the device;
* ``kernels``: the basis filter at every stage shape, batch 32 and 256, float32 and
  bfloat16: eager and CUDA-graph-replayed time against the copy of the same tensor,
  the two-matmul PyTorch filter, the autotuner's choice and the largest error;
* ``first_call``: the first call's time at a series of batch sizes (a new power-of-two
  bucket tunes once, a size inside a known bucket must not);
* ``sync``: a spanet_small training step (AMP bfloat16) under
  ``torch.cuda.set_sync_debug_mode("error")``, after a warm-up step;
* ``models``: spanet_small, ``spanet_small:reference`` and convnext_tiny, training
  (AMP bfloat16, AdamW) and inference images per second.

``--smoke`` runs the same code on the CPU in well under two minutes: the kernels
through Triton's interpreter (``TRITON_INTERPRET=1``, which the shell script sets),
tiny shapes and batches, one timed step; CUDA graphs and the sync check are skipped
there. Results: ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (a block for
``benchmarks/RESULTS.md``). The model parts use public APIs only (``timm.create_model``,
``spanet.set_spectral_impl``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_triton, next to this file
import bench_triton  # noqa: E402

#: What the full run measures, and the smoke run's stand-ins.
FULL = dict(stages=bench_triton.STAGES, batches=(32, 256), dtypes=(torch.float32, torch.bfloat16),
            first_call_batches=(1, 2, 8, 32, 33, 48, 64, 256), first_call_stage=(320, 14, 1.0),
            models=("spanet_small", "spanet_small:reference", "convnext_tiny"), image=224,
            train_batch=64, infer_batch=128, warmup=3, steps=10)
SMOKE = dict(stages=((6, 14, 2.0), (9, 7, 1.0)), batches=(1, 2), dtypes=(torch.float32, torch.bfloat16),
             first_call_batches=(1, 2, 3), first_call_stage=(9, 7, 1.0),
             models=("spanet_small", "spanet_small:reference", "convnext_tiny"), image=64,
             train_batch=2, infer_batch=2, warmup=1, steps=1)


def _section(results: Dict[str, object], name: str, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, "result": fn()}
    except Exception as exc:  # a failed section is a result too; the others still run
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)


def environment(device: torch.device) -> Dict[str, object]:
    import spanet_ops
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "device": str(device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "backends": spanet_ops.backends()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    l2_bytes=props.L2_cache_size, memory_bytes=props.total_memory)
    native = spanet_ops.backends()["native_cpu"]["available"]
    if native:
        import spanet_ops._C as C

        info["build_info"] = C.build_info()
        if device.type == "cuda" and hasattr(C, "cuda_arch_problem"):
            info["cuda_arch_problem"] = C.cuda_arch_problem(props.major, props.minor)
    return info


def kernels(device: torch.device, plan: dict) -> List[Dict[str, object]]:
    rows = []
    for dtype in plan["dtypes"]:
        for batch in plan["batches"]:
            for channels, side, radius in plan["stages"]:
                rows += bench_triton.stage_rows(batch, channels, side, radius, dtype, device)
    return rows


def first_call(device: torch.device, plan: dict) -> List[Dict[str, object]]:
    """First-call time of the kernel at each batch size, and whether the autotuner's cache grew."""
    from spanet_ops.triton import basis_filter, kernel

    channels, side, radius = plan["first_call_stage"]
    rows = []
    for dtype in plan["dtypes"]:
        for batch in plan["first_call_batches"]:
            x, basis, scale, constant = bench_triton.spf_problem(batch, channels, side, radius, dtype, device)
            cached = len(kernel._tuned_kernel.cache)
            _synchronize(device)
            start = time.perf_counter()
            basis_filter(x, basis, scale, constant)
            _synchronize(device)
            rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, "planes": x.shape[0],
                         "first_call_ms": (time.perf_counter() - start) * 1e3,
                         "tuned": len(kernel._tuned_kernel.cache) > cached})
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, device: torch.device):
    import timm

    import spanet

    base, _, impl = name.partition(":")
    model = timm.create_model(base, pretrained=False).to(device).to(memory_format=torch.channels_last)
    if impl:
        spanet.set_spectral_impl(model, impl)
    return model


def _train_step(model, optimizer, images, labels, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _inputs(batch: int, image: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=gen).to(device).to(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), generator=gen).to(device)


def sync_check(device: torch.device, plan: dict) -> Dict[str, object]:
    """A spanet_small training step issues no host synchronisation (after a warm-up step tunes the kernels)."""
    if device.type != "cuda":
        return {"skipped": "needs a CUDA device"}
    model = _model("spanet_small", device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = _inputs(8, plan["image"], device)
    _train_step(model, optimizer, images, labels, device)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(model, optimizer, images, labels, device)
        synced = ""
    except RuntimeError as exc:
        synced = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return {"host_sync": bool(synced), "first_sync": synced}


def models(device: torch.device, plan: dict) -> List[Dict[str, object]]:
    """Training (AMP bf16) and inference images per second of each model, timed after warm-up."""
    rows = []
    for name in plan["models"]:
        model = _model(name, device)
        for mode in ("train", "infer"):
            batch = plan["train_batch"] if mode == "train" else plan["infer_batch"]
            images, labels = _inputs(batch, plan["image"], device)
            if mode == "train":
                model.train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                step = lambda: _train_step(model, optimizer, images, labels, device)  # noqa: E731
            else:
                model.eval()

                def step():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                        model(images)

            for _ in range(plan["warmup"]):
                step()
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(plan["steps"]):
                step()
            _synchronize(device)
            seconds = (time.perf_counter() - start) / plan["steps"]
            rows.append({"model": name, "mode": mode, "batch": batch, "image": plan["image"],
                         "ms_per_step": seconds * 1e3, "images_per_s": batch / seconds})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["model"], r["mode"]): r["images_per_s"] for r in rows}
    for row in rows:
        base = by.get(("convnext_tiny", row["mode"]))
        row["vs_convnext_tiny"] = row["images_per_s"] / base if base else None
    return rows


def markdown(results: Dict[str, object]) -> str:
    """A block for benchmarks/RESULTS.md."""
    env = results.get("environment", {}).get("result", {})
    lines = [f"Device: {env.get('name', env.get('device', '?'))} (capability {env.get('capability', '-')}, "
             f"{env.get('sms', '-')} SMs); torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}"
             f"{'; Triton interpreter (smoke run)' if env.get('triton_interpret') == '1' else ''}.", ""]
    for name in ("kernels", "first_call", "sync", "models"):
        section = results.get(name, {})
        lines.append(f"**{name}** ({section.get('seconds', '-')} s)")
        lines.append("")
        if not section.get("ok"):
            lines += [f"failed: {section.get('error', 'not run')}", ""]
            continue
        result = section["result"]
        if name == "kernels":
            lines.append(bench_triton.markdown(result, ("shape", "dtype", "variant", "ms", "GB/s", "of copy", "error",
                                                        "config")))
        elif name == "first_call":
            lines.append(bench_triton.markdown(result, ("dtype", "batch", "planes", "first_call_ms", "tuned")))
        elif name == "sync":
            lines.append(f"host synchronisation in a training step: {result}")
        else:
            lines.append(bench_triton.markdown(result, ("model", "mode", "batch", "image", "ms_per_step",
                                                        "images_per_s", "vs_convnext_tiny")))
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-results", help="results folder")
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU, tiny sizes (interpreter)")
    args = parser.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: --smoke needs TRITON_INTERPRET=1 in the environment (scripts/gpu_check.sh sets it)")
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --smoke for the CPU run")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    plan = SMOKE if args.smoke else FULL
    os.makedirs(args.out, exist_ok=True)
    results: Dict[str, object] = {"smoke": args.smoke}
    json_path, md_path = os.path.join(args.out, "gpu_check.json"), os.path.join(args.out, "gpu_check.md")
    for name, fn in (("environment", lambda: environment(device)), ("kernels", lambda: kernels(device, plan)),
                     ("first_call", lambda: first_call(device, plan)), ("sync", lambda: sync_check(device, plan)),
                     ("models", lambda: models(device, plan))):
        _section(results, name, fn)
        print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else results[name]['error']} "
              f"({results[name]['seconds']} s)", flush=True)
        with open(json_path, "w") as handle:  # after every section: a timeout keeps what is done
            json.dump(results, handle, indent=1, default=str)
    with open(md_path, "w") as handle:
        handle.write(markdown(results) + "\n")
    print(f"gpu_check: wrote {json_path} and {md_path}")
    return 0 if all(results[name]["ok"] for name in results if name != "smoke") else 1


if __name__ == "__main__":
    sys.exit(main())
