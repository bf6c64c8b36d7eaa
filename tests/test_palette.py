"""igpt_ds.data.palette: exact fast encoding, round trip, deterministic fit, file validation, table cache."""

import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from igpt_ds.data import palette as P


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return load_sample_images().images  # china.jpg, flower.jpg: (427, 640, 3) uint8 each


@pytest.fixture(scope="module")
def photo_pixels(photos: list[np.ndarray]) -> np.ndarray:
    pixels = np.concatenate([im.reshape(-1, 3) for im in photos])
    return pixels[np.random.default_rng(0).permutation(len(pixels))[:20_000]]


@pytest.fixture(scope="module")
def photo_palette(photo_pixels: np.ndarray) -> np.ndarray:
    return P.fit_palette(photo_pixels, k=512, seed=0)


@pytest.fixture(scope="module")
def photo_lut(photo_palette: np.ndarray) -> np.ndarray:
    return P.build_lut(photo_palette)


def tie_heavy_palette(k: int = 512) -> np.ndarray:
    """Random centres plus exact pixel levels, duplicates and mirror pairs: many exact ties."""
    rng = np.random.default_rng(3)
    levels = P.to_unit(rng.integers(0, 256, (k // 4, 3)))
    mirrored = levels[:, [1, 0, 2]]
    random = rng.uniform(-1, 1, (k - 3 * len(levels), 3))
    return np.concatenate([levels, levels, mirrored, random]).astype(np.float32)  # `levels` twice


def independent_argmin(rgb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """A second, differently written exhaustive search (for data without near-ties)."""
    x = rgb.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    return np.concatenate(
        [np.argmin(((xs[:, None, :] - centres.astype(np.float64)) ** 2).sum(-1), axis=1) for xs in np.split(x, 16)]
    )


def test_table_equals_bruteforce_on_a_million_random_pixels():
    centres = tie_heavy_palette()
    pixels = np.random.default_rng(0).integers(0, 256, (1 << 20, 3), dtype=np.uint8)
    fast = P.encode(pixels, P.build_lut(centres))
    assert fast.dtype == np.uint16 and fast.shape == (1 << 20,)
    np.testing.assert_array_equal(fast, P.encode_bruteforce(pixels, centres))
    rand = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    some = pixels[:50_000]
    np.testing.assert_array_equal(P.encode(some, P.build_lut(rand)), independent_argmin(some, rand))


def test_table_equals_bruteforce_on_every_colour_with_ties():
    levels = P.to_unit(np.array([0, 64, 127, 128, 191, 255]))
    centres = np.array(
        [[levels[i], levels[j], levels[m]] for i, j, m in [(0, 0, 0), (5, 5, 5), (2, 3, 2), (3, 2, 3), (1, 4, 1)]]
        + [[levels[4], levels[1], levels[4]], [levels[2]] * 3, [levels[2]] * 3, [0, 0, 0], [0, 0, 0]],
        dtype=np.float32,
    )
    rgb = np.empty((256, 256, 256, 3), np.uint8)  # every colour, in table order
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = np.ogrid[:256, :256, :256]
    lut = P.build_lut(centres)
    ref = P.encode_bruteforce(rgb, centres, chunk=1 << 16).reshape(-1)
    np.testing.assert_array_equal(lut, ref)
    assert not np.isin([7, 9], ref).any()  # duplicates lose every tie to the lower index


def test_table_equals_bruteforce_on_photos(photos, photo_palette, photo_lut):
    for im in photos:
        np.testing.assert_array_equal(P.encode(im, photo_lut), P.encode_bruteforce(im, photo_palette))


def test_round_trip_error_is_distance_to_nearest_centre(photos, photo_palette, photo_lut):
    im = photos[1][::4, ::4]
    tokens = P.encode(im, photo_lut)
    x = P.to_unit(im.reshape(-1, 3))
    d = ((x[:, None, :] - photo_palette.astype(np.float64)) ** 2).sum(-1)  # (n, k)
    np.testing.assert_allclose(d[np.arange(len(x)), tokens.reshape(-1)], d.min(axis=1), rtol=0, atol=1e-12)
    decoded = P.decode(tokens, photo_palette)
    assert decoded.shape == im.shape and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.rint(127.5 * (photo_palette[tokens] + 1)).astype(np.uint8))


def test_pixels_on_centres_round_trip_exactly():
    colours = np.random.default_rng(5).integers(0, 256, (64, 3), dtype=np.uint8)
    centres = P.to_unit(colours).astype(np.float32)
    np.testing.assert_array_equal(P.decode(P.encode(colours, P.build_lut(centres)), centres), colours)


def test_fit_is_deterministic_and_in_range(photo_pixels, photo_palette):
    again = P.fit_palette(photo_pixels, k=512, seed=0)
    assert again.tobytes() == photo_palette.tobytes()
    assert again.shape == (512, 3) and again.dtype == np.float32 and np.abs(again).max() <= 1
    assert len(np.unique(again, axis=0)) == 512


def test_fit_with_few_colours_returns_them_exactly():
    colours = np.array([[0, 0, 0], [255, 255, 255], [10, 200, 30]], dtype=np.uint8)
    pixels = colours[np.random.default_rng(0).integers(0, 3, 1000)]
    centres = P.fit_palette(pixels, k=8)
    assert centres.shape == (8, 3)
    np.testing.assert_array_equal(P.decode(P.encode(pixels, P.build_lut(centres)), centres), pixels)


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.zeros((4, 2), np.float32), "shape"),
        (np.zeros((1, 3), np.float32), "shape"),
        (np.zeros((65536, 3), np.float32), "shape"),
        (np.full((4, 3), 1.5, np.float32), "[-1, 1]"),
        (np.full((4, 3), np.nan, np.float32), "[-1, 1]"),
        (np.zeros((4, 3), np.int64), "floats"),
    ],
)
def test_load_palette_rejects_bad_files_naming_them(tmp_path, array, problem):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(P.PaletteError, match="bad.npy") as e:
        P.load_palette(path)
    assert problem in str(e.value)


def test_load_palette_rejects_a_non_npy_file(tmp_path):
    (tmp_path / "p.npy").write_text("hello")
    with pytest.raises(P.PaletteError, match="p.npy"):
        P.load_palette(tmp_path / "p.npy")


def test_table_is_cached_beside_the_palette_by_key(tmp_path, monkeypatch):
    centres = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    path = tmp_path / "palette.npy"
    P.save_palette(path, centres)
    lut = P.palette_lut(P.load_palette(path), path)
    cache = tmp_path / f"palette.{P.palette_key(centres)[:16]}.lut.npy"
    assert cache.is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(P, "build_lut", lambda c: pytest.fail("the cached table was not used"))
    np.testing.assert_array_equal(P.palette_lut(centres, path), lut)
    monkeypatch.undo()
    cache.write_bytes(b"damaged")
    np.testing.assert_array_equal(P.palette_lut(centres, path), lut)  # rebuilt
    np.testing.assert_array_equal(np.load(cache), lut)
