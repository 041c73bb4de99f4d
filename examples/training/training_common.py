"""What the training scripts of this folder share: their section of docs/training.md, the smoke
check, the thread count, smoothed loss curves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import foveal
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "training.md"
IMAGES = ROOT / "docs" / "images"


def fix_threads(threads: int) -> None:
    """The same thread count for torch and foveal (results are deterministic for a count)."""
    torch.set_num_threads(threads)
    foveal.set_num_threads(threads)


def check_smoke(results: list) -> None:
    """Every run's loss over its last 5 steps is below its loss over the first 5."""
    for result in results:
        first, last = result["losses"][:5], result["losses"][-5:]
        assert sum(last) < sum(first), (result["kind"], first, last)


def write_section(name: str, heading: str, section: str) -> None:
    """Puts ``section`` between the markers ``<!-- name:begin -->`` and ``<!-- name:end -->`` of
    docs/training.md, or appends it under ``## heading`` when the markers are absent (text
    outside the markers is kept)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = f"{begin}\n\n{section}\n\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Training runs\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{body}\n"
    DOC.write_text(text)


def smoothed(losses: list, window: int) -> tuple[range, list]:
    """(steps, running means over ``window`` steps) for a loss curve."""
    values = torch.tensor(losses, dtype=torch.float64)
    window = max(1, min(window, len(losses)))
    means = values.unfold(0, window, 1).mean(dim=1)
    return range(window - 1, window - 1 + len(means)), means.tolist()


def base_parser(doc: str, defaults: dict) -> argparse.ArgumentParser:
    """--smoke, --threads, --seed, and an option per entry of ``defaults`` (``"eval_batch":
    256`` is ``--eval-batch``, an int defaulting to 256)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps; asserts the loss falls")
    for name, default in dict(threads=1, seed=0, **defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return parser


def train_all(kinds, train: Callable, args: argparse.Namespace, describe: Callable) -> list:
    """train(kind, args) for every kind, printing describe(result) after each; in smoke mode
    the loss of every run must have fallen."""
    fix_threads(args.threads)
    results = []
    for kind in kinds:
        results.append(train(kind, args))
        print(f"{kind:9s} {describe(results[-1])}", flush=True)
    if args.smoke:
        check_smoke(results)
    return results
