"""Evaluation on real torch-fidelity: FID/IS/KID/PRC values, extractors, caching, CLI and bad input."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import lsep_tune.evaluation.extractors as extractors_mod
from lsep_tune import evaluate as cli
from lsep_tune.data.digits import heldout_uint8, load_digits_split, to_uint8
from lsep_tune.errors import InputError
from lsep_tune.evaluation import (
    LoadedExtractor,
    ReferenceStatistics,
    UInt8ImageDataset,
    compute_metrics,
)
from lsep_tune.evaluation.digits_extractor import FEATURE_DIM, load_digits_cnn, shipped_weights_bytes
from lsep_tune.evaluation.train_digits_extractor import heldout_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_KEYS = {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall"}


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    return heldout_uint8()


@pytest.fixture(scope="module")
def train500() -> np.ndarray:
    return to_uint8(load_digits_split("train")[0][:500])


def _perturb(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID written out independently of torch-fidelity: |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "lsep_tune.evaluate", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


# --- FID / IS / KID / PRC values ------------------------------------------------------------


def test_fid_is_zero_against_itself_and_grows_with_perturbation(heldout, tmp_path):
    same = compute_metrics(heldout, "digits", metrics="fid", cache_dir=str(tmp_path))
    assert set(same) == {"fid"}
    assert abs(same["fid"]) < 1e-6

    fids = [compute_metrics(_perturb(heldout, s), "digits", "fid", cache_dir=str(tmp_path))["fid"] for s in (8, 24, 64)]
    assert fids[0] > 0.1, fids
    assert fids[0] < fids[1] < fids[2], fids
    assert fids[2] > 10 * fids[0], fids


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular covariances
def test_fid_equals_direct_frechet_distance_on_same_features(heldout, train500, tmp_path):
    fid = compute_metrics(train500, "digits", "fid", cache_dir=str(tmp_path))["fid"]
    # Same extractor, built independently through torch-fidelity's registry.
    from torch_fidelity.utils import create_feature_extractor

    fe = create_feature_extractor("digits", ["penultimate"], cuda=False, verbose=False)
    with torch.no_grad():
        f1 = fe(torch.from_numpy(train500).permute(0, 3, 1, 2))[0].double().numpy()
        f2 = fe(torch.from_numpy(heldout).permute(0, 3, 1, 2))[0].double().numpy()
    assert f1.shape[1] == FEATURE_DIM
    direct = _frechet(f1, f2)
    assert direct > 1.0  # training vs held-out digits are close but not identical
    assert fid == pytest.approx(direct, rel=1e-4)


def test_all_metrics_equal_torch_fidelity_calculate_metrics(heldout, train500, tmp_path):
    import torch_fidelity

    ours = compute_metrics(train500, "digits", "fid,isc,kid,prc", cache_dir=str(tmp_path), cuda=False)
    assert set(ours) == ALL_KEYS
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(train500), input2=UInt8ImageDataset(heldout), feature_extractor="digits",
        fid=True, isc=True, kid=True, prc=True, kid_subset_size=len(heldout),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )
    pairs = {
        "fid": "frechet_inception_distance", "isc_mean": "inception_score_mean", "isc_std": "inception_score_std",
        "kid_mean": "kernel_inception_distance_mean", "kid_std": "kernel_inception_distance_std",
        "precision": "precision", "recall": "recall",
    }
    for ours_key, their_key in pairs.items():
        assert ours[ours_key] == pytest.approx(theirs[their_key], rel=1e-5, abs=1e-9), ours_key
    assert 1.0 < ours["isc_mean"] <= 10.0  # 10 classes bound the digits Inception Score
    assert 0.5 < ours["precision"] <= 1.0 and 0.5 < ours["recall"] <= 1.0


# --- the digits extractor ---------------------------------------------------------------------


def test_shipped_digits_extractor_accuracy():
    model = load_digits_cnn()
    assert heldout_accuracy(model) >= 0.97


# The recipe is deterministic on one machine, but training amplifies the last-bit differences
# between CPUs' float kernels: retrained on another x86 CPU the weights drift from the shipped ones
# (measured: conv1.weight 1.4% and the deepest conv layer 25% relative L2 distance, held-out accuracy
# 98.6% against 98.9%). The first conv layer, which sees the least of that amplification, is where a
# changed recipe shows (measured on the same CPU): +10% learning rate moved it 8.1%, 30 instead of 40
# epochs 3.5%, no shift augmentation 21%, another seed 150%. One epoch less (1.8%) is within the
# CPU noise and passes.
CONV1_TOLERANCE = 0.03  # relative L2 distance of conv1.weight to the shipped weights
ACCURACY_TOLERANCE = 0.01  # held-out accuracy against the shipped extractor's


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.slow
def test_training_script_reproduces_shipped_weights(tmp_path):
    """Retraining with the script gives the shipped extractor up to CPU float noise, not bit for bit."""
    out = tmp_path / "digits_cnn.pt"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "lsep_tune.evaluation.train_digits_extractor", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr
    accuracy = float(proc.stdout.split("held-out accuracy:")[1].split()[0])
    assert accuracy >= 0.97
    shipped = torch.load(io.BytesIO(shipped_weights_bytes()), weights_only=True)
    retrained = torch.load(out, weights_only=True)
    assert shipped.keys() == retrained.keys()
    for key in shipped:
        assert shipped[key].dtype == retrained[key].dtype and shipped[key].shape == retrained[key].shape, key
    assert accuracy == pytest.approx(heldout_accuracy(load_digits_cnn()), abs=ACCURACY_TOLERANCE)
    assert _relative_distance(retrained["conv1.weight"], shipped["conv1.weight"]) < CONV1_TOLERANCE


# --- the Inception path, on a random state dict the test saves ----------------------------------


def _random_inception_state_dict(path, seed: int = 0) -> None:
    """A state dict of torch-fidelity's InceptionV3 with He-normal random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh modules
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    template = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        if key.endswith("conv.weight"):  # He init keeps activations alive through ~40 layers
            value = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / value[0].numel())
        elif key == "fc.weight":
            value = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[1])
        state[key] = value.clone()
    torch.save(state, path)


def test_inception_loads_local_state_dict_and_scores(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    weights = tmp_path / "inception.pt"
    _random_inception_state_dict(weights)
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ref_images = np.repeat(np.repeat(rng.integers(0, 256, (4, 2, 2, 3)), 8, 1), 8, 2).astype(np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, ref_images)

    out = compute_metrics(
        samples, str(ref), "isc,kid", extractor="inception-v3-compat", extractor_weights=str(weights),
        cache_dir=str(tmp_path / "cache"), cuda=False, isc_splits=2,
    )
    assert set(out) == {"isc_mean", "isc_std", "kid_mean", "kid_std"}

    # The same weights through torch-fidelity's own loader give the same numbers.
    direct = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        f_s, logits_s = direct(torch.from_numpy(samples).permute(0, 3, 1, 2))
        f_r, _ = direct(torch.from_numpy(ref_images).permute(0, 3, 1, 2))
    assert f_s.shape == (4, 2048) and float(f_s.std(0).mean()) > 0  # random but not degenerate features
    isc = isc_features_to_metric(logits_s, splits=2, shuffle=True, rng_seed=2020)
    kid = kid_features_to_metric(f_s, f_r, kid_subsets=100, kid_subset_size=4, rng_seed=2020, verbose=False)
    assert out["isc_mean"] == pytest.approx(isc["inception_score_mean"], rel=1e-4)
    assert out["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-3, abs=1e-7)
    assert all(math.isfinite(v) for v in out.values())
    # One cache entry, keyed by the reference contents and these weights.
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    # Grey images reach Inception as three equal channels.
    grey = samples[:2, :, :, :1]
    ours = LoadedExtractor("inception-v3-compat", str(weights), cuda=False).extract(grey)["2048"]
    with torch.no_grad():
        rgb = direct(torch.from_numpy(np.repeat(grey, 3, axis=3)).permute(0, 3, 1, 2))[0]
    assert torch.allclose(ours, rgb, rtol=1e-5, atol=1e-6)


def test_inception_refuses_bad_state_dicts(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(InputError, match="state_dict: does not fit the inception-v3-compat network"):
        LoadedExtractor("inception-v3-compat", str(wrong), cuda=False)
    pickled = tmp_path / "pickled.pt"
    torch.save({"x": argparse.Namespace(a=1)}, pickled)  # needs arbitrary unpickling
    with pytest.raises(InputError, match="weights_only=True"):
        LoadedExtractor("inception-v3-compat", str(pickled), cuda=False)
    with pytest.raises(InputError, match="file not found"):
        LoadedExtractor("inception-v3-compat", str(tmp_path / "missing.pt"), cuda=False)


def test_inception_weights_unavailable_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(extractors_mod, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")
    images = np.zeros((4, 16, 16, 3), np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, images)
    with pytest.raises(InputError) as info:
        compute_metrics(images, str(ref), "fid", cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "\n" not in message
    assert "--extractor-weights PATH" in message
    expected_cache = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(expected_cache) in message
    ckpt_dir = expected_cache.parent
    assert not ckpt_dir.exists() or list(ckpt_dir.iterdir()) == []  # no half-downloaded file left


# --- references: npz, cache, statistics files, folders ------------------------------------------


def test_reference_cache_and_statistics_files(heldout, train500, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, heldout)
    cache = tmp_path / "cache"
    first = compute_metrics(train500, str(ref), "fid,kid", cache_dir=str(cache))
    entries = list(cache.glob("*.npz"))
    assert len(entries) == 1
    # The cache entry is itself a statistics file usable as the reference.
    stats = ReferenceStatistics.load(str(entries[0]))
    assert stats.extractor_name == "digits" and stats.image_shape == (8, 8, 1) and stats.num_images == len(heldout)
    again = compute_metrics(train500, str(entries[0]), "fid,kid", cache_dir=str(cache))
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert again["kid_mean"] == pytest.approx(first["kid_mean"], rel=1e-6)
    # Same contents as the built-in 'digits' reference: same numbers.
    assert compute_metrics(train500, "digits", "fid", cache_dir=str(cache))["fid"] == pytest.approx(first["fid"], rel=1e-9)
    # Changed contents: a new entry, a different FID.
    np.savez(ref, heldout[:-20])
    changed = compute_metrics(train500, str(ref), "fid", cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 3  # heldout file, digits reference, shortened file
    assert changed["fid"] != pytest.approx(first["fid"], rel=1e-6)

    # mu/sigma-only statistics serve FID but not KID.
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=stats.mu, sigma=stats.sigma)
    assert compute_metrics(train500, str(bare), "fid", cache_dir=str(cache))["fid"] == pytest.approx(first["fid"], rel=1e-9)
    with pytest.raises(InputError, match="features"):
        compute_metrics(train500, str(bare), "kid", cache_dir=str(cache))


def test_image_folder_reference(heldout, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(heldout[:60]):
        Image.fromarray(img[..., 0], mode="L").save(folder / f"{i:03d}.png")
    out = compute_metrics(heldout[:60], str(folder), "fid", cache_dir=str(tmp_path / "cache"))
    assert abs(out["fid"]) < 1e-6
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.repeat(heldout[0], 3, axis=2)).save(rgb / "a.png")
    with pytest.raises(InputError, match="reference images are 8x8x3"):
        compute_metrics(heldout[:60], str(rgb), "fid", cache_dir=str(tmp_path / "cache"))


# --- bad input -----------------------------------------------------------------------------------


def _bad_cases(h):
    return {
        "float dtype": (dict(samples=h.astype(np.float32), reference="digits"), "dtype float32"),
        "NCHW shape": (dict(samples=np.ascontiguousarray(h.transpose(0, 3, 1, 2)), reference="digits"), "NCHW"),
        "3-d array": (dict(samples=h[..., 0], reference="digits"), "expected shape (N, H, W, C)"),
        "torch tensor": (dict(samples=torch.from_numpy(h), reference="digits"), "numpy array"),
        "other resolution": (dict(samples=np.zeros((20, 16, 16, 1), np.uint8), reference="digits"), "reference images are 8x8x1"),
        "other channels": (dict(samples=np.zeros((20, 8, 8, 3), np.uint8), reference="digits"), "samples are 8x8x3"),
        "one sample for fid": (dict(samples=h[:1], reference="digits", metrics="fid"), "FID needs at least 2 images, got 1"),
        "fewer than isc splits": (dict(samples=h[:5], reference="digits", metrics="isc"), "IS with 10 splits needs at least 10"),
        "fewer than kid subset": (dict(samples=h[:50], reference="digits", metrics="kid", kid_subset_size=100), "KID needs at least 100"),
        "too few for prc": (dict(samples=h[:3], reference="digits", metrics="prc"), "precision/recall with 3 neighbours needs at least 4"),
        "unknown metric": (dict(samples=h, reference="digits", metrics="fid,ppl"), "unknown metric"),
        "unknown extractor": (dict(samples=h, reference="digits", extractor="vgg16"), "unknown extractor"),
        "missing reference": (dict(samples=h, reference="/nonexistent/ref.npz"), "not found"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(np.zeros((1, 8, 8, 1), np.uint8))))
def test_bad_input_raises_one_line_evaluation_error(case, heldout, tmp_path):
    kwargs, fragment = _bad_cases(heldout)[case]
    with pytest.raises(InputError) as info:
        compute_metrics(cache_dir=str(tmp_path), **kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert fragment in str(info.value)


def test_reference_at_other_resolution_from_file(heldout, tmp_path):
    ref = tmp_path / "big.npz"
    np.savez(ref, np.zeros((10, 16, 16, 1), np.uint8))
    with pytest.raises(InputError) as info:
        compute_metrics(heldout, str(ref), "fid", cache_dir=str(tmp_path))
    assert str(info.value).startswith(f"{ref}: shape: reference images are 16x16x1")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_json_end_to_end_and_bad_file(heldout, tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, heldout[:120])
    proc = _run_cli("--samples", str(samples), "--reference", "digits", "--metrics", "fid,isc,kid,prc",
                    "--cache-dir", str(tmp_path / "cache"), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == ALL_KEYS
    assert all(isinstance(v, float) for v in result.values())
    assert result["fid"] > 0 and result["precision"] > 0.5

    bad = tmp_path / "bad.npz"
    np.savez(bad, heldout[:120].astype(np.float32))
    proc = _run_cli("--samples", str(bad), "--reference", "digits", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: arr_0: expected uint8")


@pytest.mark.parametrize(
    "make, args, prefix",
    [
        (None, ["--samples", "{tmp}/missing.npz", "--reference", "digits"], "error: {tmp}/missing.npz: path: file not found"),
        ("noarr", ["--samples", "{tmp}/noarr.npz", "--reference", "digits"], "error: {tmp}/noarr.npz: arr_0: missing"),
        ("text", ["--samples", "{tmp}/text.npz", "--reference", "digits"], "error: {tmp}/text.npz: format:"),
        ("ok", ["--samples", "{tmp}/ok.npz", "--reference", "{tmp}/big.npz"], "error: {tmp}/big.npz: shape: reference images are 16x16x1"),
        ("ok", ["--samples", "{tmp}/ok.npz", "--reference", "digits", "--metrics", "fid,foo"], "error: --metrics: foo: unknown metric"),
        ("ok", ["--samples", "{tmp}/ok.npz", "--reference", "digits", "--extractor", "clip"], "error: --extractor: clip: unknown extractor"),
        ("few", ["--samples", "{tmp}/few.npz", "--reference", "digits"], "error: {tmp}/few.npz: count: FID needs at least 2"),
        (None, ["--samples", "x.npz"], "error: command line: arguments:"),
    ],
)
def test_cli_bad_input_one_line_exit_2(make, args, prefix, heldout, tmp_path, capsys):
    tmp = str(tmp_path)
    if make == "noarr":
        np.savez(tmp_path / "noarr.npz", images=heldout)
    elif make == "text":
        (tmp_path / "text.npz").write_text("not a zip")
    elif make == "ok":
        np.savez(tmp_path / "ok.npz", heldout[:20])
        np.savez(tmp_path / "big.npz", np.zeros((10, 16, 16, 1), np.uint8))
    elif make == "few":
        np.savez(tmp_path / "few.npz", heldout[:1])
    argv = [a.format(tmp=tmp) for a in args] + ["--cache-dir", f"{tmp}/cache", "--json"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors exit from inside parse_args
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(prefix.format(tmp=tmp)), lines[0]


def test_cli_table_output(heldout, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, heldout[:50])
    assert cli.main(["--samples", str(samples), "--reference", "digits", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = dict(line.split(None, 1) for line in out)
    assert rows["extractor"] == "digits"
    assert {"fid", "isc_mean", "isc_std"} <= rows.keys()
    float(rows["fid"])
