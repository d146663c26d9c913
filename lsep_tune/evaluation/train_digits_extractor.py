"""Reproduce the shipped ``digits`` extractor weights: ``python -m lsep_tune.evaluation.train_digits_extractor --out PATH``.

Training is deterministic so that anyone can check the shipped file came from this code: a fixed
seed for initialisation, dropout, shuffling and augmentation, one CPU thread (the result then does
not depend on the core count), and ``torch.use_deterministic_algorithms``. Two runs with the same
torch build on the same CPU type give bit-identical weights; on another CPU type float rounding
differs and training amplifies it, so the weights agree only within a tolerance (see the README). It trains on the digits *training*
split only (the held-out split is the FID reference) and takes well under a minute.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys

import torch
import torch.nn.functional as F

from lsep_tune.data.digits import load_digits_split, to_uint8
from lsep_tune.errors import OneLineParser, run_cli
from lsep_tune.evaluation.digits_extractor import DigitsCNN, uint8_to_model_space
from lsep_tune.files import atomic_write, require_writable_dir

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 1e-4
MIN_HELDOUT_ACCURACY = 0.97


@contextlib.contextmanager
def _deterministic_cpu():
    """One thread + deterministic kernels for the duration, then restore the caller's settings."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _split_as_extractor_sees_it(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images round-tripped through uint8, exactly the input the extractor gets from sample files."""
    images, labels = load_digits_split(split)
    u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
    return uint8_to_model_space(u8), labels


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def heldout_accuracy(model: DigitsCNN) -> float:
    """Top-1 accuracy on the held-out split, through the same uint8 preprocessing as evaluation."""
    x, y = _split_as_extractor_sees_it("heldout")
    model.eval()
    return float((model(x).argmax(dim=1) == y).double().mean())


def train_digits_cnn(seed: int = SEED, epochs: int = EPOCHS) -> tuple[dict[str, torch.Tensor], float]:
    """Train the CNN deterministically; returns (state dict, held-out accuracy)."""
    with _deterministic_cpu():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x, y = _split_as_extractor_sees_it("train")
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        steps_per_epoch = math.ceil(len(y) / BATCH_SIZE)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), BATCH_SIZE):
                idx = perm[start : start + BATCH_SIZE]
                loss = F.cross_entropy(model(_random_shift(x[idx], gen)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        accuracy = heldout_accuracy(model)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, accuracy


def state_dict_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialise through memory: torch.save names the archive after a real file, so the bytes of
    a file saved directly would depend on its name; through a buffer they depend only on the weights."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_state_dict(state: dict[str, torch.Tensor], out: str) -> None:
    """Write atomically so an interrupted run leaves no half-written weights."""
    with atomic_write(out) as fh:
        fh.write(state_dict_bytes(state))


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(argv))


def _train(argv: list[str] | None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the state dict (torch.save)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    require_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    state, accuracy = train_digits_cnn(seed=args.seed, epochs=args.epochs)
    save_state_dict(state, args.out)
    print(f"held-out accuracy: {accuracy:.4f}")
    print(f"wrote {args.out}")
    if accuracy < MIN_HELDOUT_ACCURACY:
        print(f"warning: held-out accuracy below {MIN_HELDOUT_ACCURACY}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
