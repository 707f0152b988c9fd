"""ADM evaluator metrics: the statistics math against scipy/numpy known answers, the reference-batch reader on
synthetic ``.npz`` files in the ADM layout, the whole evaluation on a small feature network, and (with
torch-fidelity installed) the InceptionV3 feature path on random weights."""

import importlib.util
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from dit_fast.sampling import adm_eval
from dit_fast.sampling.adm_eval import (
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_DIM,
    Statistics,
    check_images,
    evaluate,
    inception_score,
    manifold_radii,
    open_npz_array,
    pairwise_sq_distances,
    precision_recall,
    read_stored_statistics,
)

needs_torch_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                          reason="torch-fidelity is not installed (pip install 'dit-fast[eval]')")


def _random_cov(rng: np.random.RandomState, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.randn(d, rank or d)
    return a @ a.T / d


# ---------------------------------------------------------------------------------------------------- FID math

@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_distance_matches_scipy_sqrtm(rank):
    """ADM's formula (scipy.linalg.sqrtm of sigma1 @ sigma2) on full-rank and singular covariances."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.RandomState(0)
    d = 24
    mu1, mu2 = rng.randn(d), rng.randn(d)
    s1, s2 = _random_cov(rng, d, rank), _random_cov(rng, d)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = Statistics(mu1, s1).frechet_distance(Statistics(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_known_answers():
    d = 10
    eye = np.eye(d)
    mu = np.arange(d, dtype=np.float64)
    assert Statistics(mu, eye).frechet_distance(Statistics(mu, eye)) == pytest.approx(0, abs=1e-10)
    assert Statistics(np.zeros(d), eye).frechet_distance(Statistics(mu, eye)) == pytest.approx(mu @ mu)
    # N(0, I) vs N(0, 4I): tr(I + 4I - 2 * 2I) = d
    assert Statistics(np.zeros(d), eye).frechet_distance(Statistics(np.zeros(d), 4 * eye)) == pytest.approx(d)


def test_statistics_of_features_match_numpy():
    f = np.random.RandomState(1).randn(50, 6)
    stats = Statistics.of(f)
    np.testing.assert_allclose(stats.mu, f.mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False))


# ---------------------------------------------------------------------------------------------------- Inception Score

def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's computation, written out: softmax, then the per-split KL formula on the probabilities."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_matches_adm_formula():
    logits = np.random.RandomState(2).randn(23, 17) * 3
    for split in (5000, 10, 7):
        assert inception_score(logits, split) == pytest.approx(_adm_inception_score(logits, split), rel=1e-10)


def test_inception_score_known_answers():
    assert inception_score(np.zeros((8, 5))) == pytest.approx(1.0)  # every prediction uniform: no information
    confident = np.full((40, 8), -1e4)
    confident[np.arange(40), np.arange(40) % 8] = 0  # certain, classes balanced: IS = number of classes
    assert inception_score(confident) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="logits must be"):
        inception_score(np.zeros(5))


# ---------------------------------------------------------------------------------------------------- precision/recall

def test_pairwise_sq_distances_fp16_rounding_and_overflow():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(9, 32, generator=g), torch.randn(11, 32, generator=g)
    exact = torch.cdist(u.double(), v.double()) ** 2
    d = pairwise_sq_distances(u, v)
    assert torch.equal(d, d.half().float())  # float16 values, as ADM's distance block returns them
    torch.testing.assert_close(d.double(), exact, rtol=3e-3, atol=1e-2)
    big = pairwise_sq_distances(u * 100, v * 100)  # beyond float16's range: float32 fallback
    torch.testing.assert_close(big.double(), exact * 1e4, rtol=1e-4, atol=1.0)


def _brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int) -> tuple[float, float]:
    def sq(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    ref_radii = np.sort(sq(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq(samples, samples), axis=1)[:, k]
    d = sq(ref, samples)  # (N, M)
    precision = (d <= ref_radii[:, None]).any(axis=0).mean()
    recall = (d <= sample_radii[None]).any(axis=1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("block", [7, 4096])
def test_precision_recall_against_brute_force(block):
    rng = np.random.RandomState(3)
    # integer-valued features: every squared distance is exact in float16, so no tie is decided by rounding
    ref = rng.randint(-3, 4, (30, 5)).astype(np.float32)
    samples = (rng.randint(-3, 4, (41, 5)) + np.array([2, 0, 0, 0, 0])).astype(np.float32)
    expected = _brute_force_pr(ref, samples, 3)
    got = precision_recall(torch.from_numpy(ref), torch.from_numpy(samples), k=3, block=block)
    assert got == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the sets overlap partly: both branches matter
    radii = manifold_radii(torch.from_numpy(ref), k=3, block=block).numpy()
    np.testing.assert_array_equal(radii, np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), axis=1)[:, 3])


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(20, 8, generator=g)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs more than 3 features"):
        manifold_radii(a[:3])


# ---------------------------------------------------------------------------------------------------- npz reading

def _adm_reference(path, n: int = 10, size: int = 8, stats: bool = True, compressed: bool = False) -> np.ndarray:
    """An ADM-layout reference batch: arr_0 (n, size, size, 3) uint8 and, optionally, mu/sigma/mu_s/sigma_s."""
    rng = np.random.RandomState(5)
    images = rng.randint(0, 256, (n, size, size, 3), dtype=np.uint8)
    arrays = {"arr_0": images}
    if stats:
        arrays |= {"mu": rng.randn(POOL_DIM).astype(np.float32), "sigma": np.eye(POOL_DIM, dtype=np.float32),
                   "mu_s": rng.randn(SPATIAL_DIM).astype(np.float32), "sigma_s": np.eye(SPATIAL_DIM, dtype=np.float32)}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return images


@pytest.mark.parametrize("compressed", [False, True])
def test_reference_reader_streams_batches(tmp_path, compressed):
    path = tmp_path / "ref.npz"
    images = _adm_reference(path, compressed=compressed)
    with open_npz_array(path, "arr_0") as reader:
        check_images(reader, path)
        assert reader.shape == images.shape and reader.dtype == np.uint8 and len(reader) == 10
        batches = list(reader.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    pool, spatial = read_stored_statistics(path)
    with np.load(path) as f:
        np.testing.assert_array_equal(pool.mu, f["mu"])
        np.testing.assert_array_equal(spatial.sigma, f["sigma_s"])
    assert pool.sigma.dtype == np.float64 and spatial.mu.shape == (SPATIAL_DIM,)


def test_reference_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with open_npz_array(tmp_path / "missing.npz", "arr_0"):
            pass
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        with open_npz_array(tmp_path / "text.npz", "arr_0"):
            pass
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no array 'arr_0' \(it has \['images'\]\)"):
        with open_npz_array(tmp_path / "other.npz", "arr_0"):
            pass
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        with open_npz_array(tmp_path / "float.npz", "arr_0") as reader:
            check_images(reader, tmp_path / "float.npz")
    np.savez(tmp_path / "partial.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(POOL_DIM))
    with pytest.raises(ValueError, match="but not"):
        read_stored_statistics(tmp_path / "partial.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(ValueError, match="wrong shape"):
        read_stored_statistics(tmp_path / "shapes.npz")
    assert read_stored_statistics(tmp_path / "other.npz") is None


def test_truncated_array_is_an_error(tmp_path):
    path = tmp_path / "ref.npz"
    _adm_reference(path, stats=False)
    with zipfile.ZipFile(path) as z:
        data = z.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as z:
        z.writestr("arr_0.npy", data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        with open_npz_array(tmp_path / "cut.npz", "arr_0") as reader:
            list(reader.batches(4))


# ---------------------------------------------------------------------------------------------------- evaluation

class PixelFeatures(nn.Module):
    """A small deterministic stand-in for Inception with its output shapes: random projections of pooled pixels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.register_buffer("w_pool", torch.randn(48, POOL_DIM, generator=g))
        self.register_buffer("w_spatial", torch.randn(48, SPATIAL_DIM, generator=g))
        self.register_buffer("w_logits", torch.randn(POOL_DIM, NUM_LOGITS, generator=g) / POOL_DIM**0.5)

    def forward(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(images).float().permute(0, 3, 1, 2) / 255  # (N, 3, H, W)
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 48)
        pool = torch.relu(pooled @ self.w_pool)
        return pool, pooled @ self.w_spatial, pool @ self.w_logits


def test_evaluate_known_answers(tmp_path):
    """Samples equal to the reference images: FID = sFID = 0 and precision = recall = 1 (the reference's statistics
    computed from its images); darker samples score worse against the same statistics stored in the file."""
    ref = tmp_path / "ref.npz"
    images = _adm_reference(ref, n=12, stats=False)
    np.savez(tmp_path / "same.npz", arr_0=images, labels=np.arange(12))
    features = PixelFeatures()
    result = evaluate(tmp_path / "same.npz", ref, features, batch_size=5)
    acts = adm_eval.compute_activations(ref, features, batch_size=12)
    pool, spatial = Statistics.of(acts.pool), Statistics.of(acts.spatial)
    # zero up to the square root of the covariances' round-off eigenvalues (rank 11 of 2048)
    assert result["fid"] == pytest.approx(0, abs=1e-5 * np.trace(pool.sigma))
    assert result["sfid"] == pytest.approx(0, abs=1e-5 * np.trace(spatial.sigma))
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["num_samples"] == 12 and result["num_reference"] == 12 and result["inception_score"] > 1

    stored = tmp_path / "stored.npz"
    np.savez(stored, arr_0=images, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)

    darker = (images // 3).astype(np.uint8)
    np.savez(tmp_path / "darker.npz", arr_0=darker)
    worse = evaluate(tmp_path / "darker.npz", stored, features, batch_size=5)
    assert worse["fid"] > 1 and worse["sfid"] > 1 and worse["precision"] < 1


def test_missing_weights_name_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        adm_eval.inception_weights_path()
    message = str(e.value)
    assert adm_eval.INCEPTION_URL in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="do not exist"):
        adm_eval.inception_weights_path(tmp_path / "nope.pth")
    bogus = tmp_path / adm_eval.INCEPTION_FILE
    torch.save({"w": torch.zeros(3)}, bogus)
    with pytest.raises(ValueError, match="different or truncated file"):
        adm_eval.read_inception_weights(bogus)


# ---------------------------------------------------------------------------------------------------- InceptionV3

@needs_torch_fidelity
def test_inception_feature_path_random_weights():
    torch.manual_seed(0)
    net = adm_eval.InceptionFeatures("random").eval()
    images = np.random.RandomState(7).randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    captured = {}
    hook = net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o.clone()))
    pool, spatial, logits = net(images)
    hook.remove()
    assert pool.shape == (3, POOL_DIM) and spatial.shape == (3, SPATIAL_DIM) and logits.shape == (3, NUM_LOGITS)
    assert captured["spatial"].shape == (3, 192, 17, 17)
    # mixed_6/conv[..., :7] in TF's NHWC order
    torch.testing.assert_close(spatial, captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    torch.testing.assert_close(logits, pool @ net.net.fc.weight.T, rtol=1e-5, atol=1e-5)  # no bias, as ADM
    assert pool.std() > 1e-2 and spatial.std() > 1e-2 and (pool >= 0).all()
    # one image alone gives the same features as in a batch
    alone = net(images[1:2])
    torch.testing.assert_close(alone[0], pool[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[1], spatial[1:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        net(images.astype(np.float32))


@needs_torch_fidelity
def test_evaluate_with_random_inception(tmp_path):
    torch.manual_seed(0)
    net = adm_eval.InceptionFeatures("random").eval()
    ref = tmp_path / "ref.npz"
    images = _adm_reference(ref, n=6, size=16, stats=False)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    result = evaluate(tmp_path / "samples.npz", ref, net, batch_size=4)
    assert result["fid"] == pytest.approx(0, abs=1e-3) and result["precision"] == 1.0 and result["recall"] == 1.0


def test_cli_evaluate_ref_names_what_is_missing(tmp_path, monkeypatch, capsys):
    from dit_fast.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _adm_reference(tmp_path / "ref.npz", stats=False)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    with pytest.raises(SystemExit, match="torch-fidelity"):
        main(["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--ref needs a samples"):
        main(["evaluate", "--frechet", "a.npz", "b.npz", "--ref", str(tmp_path / "ref.npz")])
