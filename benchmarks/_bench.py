"""Shared helpers of the benchmark scripts: arguments, model loading, timing, tables, the RATIO line.

Import this module *before* torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` (spin-waiting OpenMP
threads made small models up to 10x slower on the shared 2-vCPU machines) and
``HF_HUB_OFFLINE=1`` (no network look-ups when loading the starter model's text tower), and keeps
freed memory in the process as the product does (:func:`clipopt_core.runtime.memory.retain_freed_memory`;
``CLIPOPT_RETAIN_FREED_MEMORY=0`` measures glibc's defaults).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clipopt_core.runtime.memory import retain_freed_memory  # noqa: E402

RETAINED = retain_freed_memory()  # as the product's processes do (CLI, Dagster compute, Pipes child)

import torch  # noqa: E402

REAL_MODEL = "starter"
SMOKE_MODEL = "clipopt-tiny"
STARTER_IMAGE_SIZE = 112


def parser(doc: str | None) -> argparse.ArgumentParser:
    """``--device``, ``--smoke``, ``--model``, ``--image-size``, ``--threads``, ``--warmup``, ``--repeats``."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and the tiny model; runs in seconds, no targets")
    ap.add_argument("--model", default=None, help=f"ModelSpec name (default {REAL_MODEL}; {SMOKE_MODEL} with --smoke)")
    ap.add_argument("--image-size", type=int, default=None,
                    help=f"input side in px (default {STARTER_IMAGE_SIZE} for the starter model, else the model's own)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations before measuring")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (the median is reported)")
    return ap


def finish_args(args: argparse.Namespace, *, warmup: int = 2, repeats: int = 5) -> argparse.Namespace:
    """Fill the defaults that depend on ``--smoke``; apply ``--threads``; check the device."""
    args.model = args.model or (SMOKE_MODEL if args.smoke else REAL_MODEL)
    if args.image_size is None and args.model == REAL_MODEL:
        args.image_size = STARTER_IMAGE_SIZE
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else warmup)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.smoke else repeats)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    return args


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPOPT_CACHE", str(Path.home() / ".cache" / "clipopt")))


def load(args: argparse.Namespace):
    """A fresh :class:`ClipBundle` for ``args.model`` on ``args.device`` (same weights at every call)."""
    from clipopt_core.models.loading import ModelSpec, load_model

    return load_model(ModelSpec(args.model, image_size=args.image_size), cache_dir=cache_dir(), device=args.device)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str | torch.device = "cpu") -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                        device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Like :func:`measure` for several callables, taking turns (round-robin) so that drift of a
    shared, noisy machine hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``min–max`` of a list of seconds, for the tables."""
    return f"{min(values):.3f}-{max(values):.3f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain-text table (floats with 4 significant digits)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def ratio_line(**ratios: float) -> None:
    """The machine-readable last line: ``RATIO name=value ...``."""
    print("RATIO " + " ".join(f"{name}={value:.3f}" for name, value in ratios.items()), flush=True)


def header(args: argparse.Namespace, **sizes: Any) -> None:
    """One line with the machine, torch and the sizes used (so a table can be reproduced)."""
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else platform.processor() or "cpu"
    extra = " ".join(f"{k}={v}" for k, v in sizes.items())
    print(f"# device={args.device} ({device}) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} model={args.model} smoke={args.smoke} "
          f"warmup={args.warmup} repeats={args.repeats} retain_freed_memory={RETAINED} {extra}", flush=True)


class PeakRSS:
    """Peak resident-set growth (bytes) over a ``with`` block, sampled from /proc every ``interval`` s.

    tracemalloc does not see torch's or faiss' allocations, so the RSS is sampled instead;
    short spikes between samples can be missed (a lower bound).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def shapes_images(root: Path, count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Write the test suite's drawn-shape source (16 classes) with about ``count`` images → (uris, labels)."""
    threads = torch.get_num_threads()
    from tests.conftest import write_shapes_source  # sets torch threads to 1 at import: restored below

    torch.set_num_threads(threads)
    per_class = max(1, -(-count // 16))
    write_shapes_source(root, per_class=per_class, seed=seed)
    return source_images(str(root))


def source_images(location: str) -> tuple[list[str], list[int]]:
    """(uris, integer labels) of an image source folder (class folders or manifest), without validation."""
    from clipopt_core.data import manifest as mf
    from clipopt_core.data.datasets import encode_labels

    rows = mf.scan_source(location)
    root = mf.source_root(location).rstrip("/")
    labels, _ = encode_labels([str(x) for x in rows["label"].to_list()])
    return [f"{root}/{path}" for path in rows["path"].to_list()], labels


def fit_stepper(task: Any, config: Any, device: str) -> Callable[[Any], None]:
    """One optimizer step exactly as :func:`clipopt_core.train.loop.fit` takes it (AdamW groups with
    ``base_lr``, per-step cosine LR, autocast/scaler, clipping), minus validation and checkpoints."""
    from clipopt_core.train import loop as training

    optimizer = torch.optim.AdamW(task.param_groups(config), betas=config.betas, eps=config.eps)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    dtype = training.autocast_dtype_for(config.precision, torch.device(device))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    state = {"step": 0}
    task.train_mode()

    def step(batch: Any) -> None:
        for group in optimizer.param_groups:
            group["lr"] = training.cosine_lr(group["base_lr"], config.lr_floor, state["step"], 10_000)
        training.optimizer_step(task, [batch], optimizer, scaler, config, dtype)
        state["step"] += 1

    return step


def autocast(device: str, precision: str) -> torch.autocast:
    """The autocast :func:`fit` uses (reduced precision on CUDA only), for the bare reference loops."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype, enabled=device.startswith("cuda") and precision != "fp32")
