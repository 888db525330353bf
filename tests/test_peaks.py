"""Reading a score map into located peaks (node.preprocessing.locate_peaks), the code training's FROC uses too."""

from __future__ import annotations

import numpy as np
import pytest

from node.preprocessing import locate_peaks, map_to_source, prepare_slices, resized_extent

SPACING = (5.0, 0.7, 0.7)


def peaks(maps: np.ndarray, **kw):
    args = dict(source_shape=(512, 512), size=128, spacing=SPACING, min_probability=0.1, max_peaks=5)
    args.update(kw)
    return locate_peaks(maps, **args)


def gaussian(shape, centre, sigma, height=0.9):
    z, y, x = np.indices(shape, dtype=np.float64)
    d2 = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    return (height * np.exp(-d2 / (2 * sigma**2))).astype(np.float32)


def test_map_coordinates_follow_the_resize_geometry():
    # a 512-pixel slice at 128: 4 source pixels per model pixel, centres on integers
    assert map_to_source(0, 128, 512, 128) == pytest.approx(1.5)
    assert map_to_source(0, 32, 512, 128) == pytest.approx(7.5)  # a stride-4 map: 16 source pixels a cell
    assert map_to_source(31, 32, 512, 128) == pytest.approx(503.5)
    # 500 rows at 128: the box average covers 3 x 166 = 498 rows, the last two are dropped
    assert resized_extent(500, 128) == 498
    # the same point seen through prepare_slices: a bright pixel block lands where map_to_source says
    vol = np.full((1, 512, 512), -1000, np.int16)
    vol[0, 200:204, 300:304] = 400
    m = prepare_slices(vol, size=128)[0, :, :, 0]
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert (map_to_source(y, 128, 512, 128), map_to_source(x, 128, 512, 128)) == (201.5, 301.5)


def test_a_blob_between_cells_is_found_to_a_fraction_of_a_cell():
    maps = gaussian((9, 32, 32), (4, 10.3, 20.6), sigma=1.2)
    (p,) = peaks(maps)
    assert p.slice == 4
    assert p.row == pytest.approx(map_to_source(10.3, 32, 512, 128), abs=4)  # within a quarter of a 16-px cell
    assert p.column == pytest.approx(map_to_source(20.6, 32, 512, 128), abs=4)
    assert p.probability == pytest.approx(float(maps.max()))


@pytest.mark.parametrize("cells, size", [(32, 128), (128, 128)])  # a stride-4 map; a full-resolution one
def test_a_saturated_plateau_is_placed_on_its_middle(cells, size):
    maps = np.zeros((7, cells, cells), np.float32)
    width = 3 if cells == 32 else 7  # about 30 mm and 12 mm across
    maps[2:5, 10:10 + width, 20:20 + width - 2] = 1.0  # equal values over 3 slices
    (p,) = peaks(maps, size=size)
    assert p.slice == 3
    assert p.row == pytest.approx(map_to_source(10 + (width - 1) / 2, cells, 512, size))
    assert p.column == pytest.approx(map_to_source(20 + (width - 3) / 2, cells, 512, size))


def test_one_nodule_on_neighbouring_slices_is_one_peak_and_two_apart_are_two():
    maps = gaussian((12, 32, 32), (3, 10, 10), 1.0) + gaussian((12, 32, 32), (3.6, 11, 10), 1.0, 0.8)
    maps += gaussian((12, 32, 32), (8, 25, 25), 1.0, 0.7)  # 30+ mm away
    found = peaks(maps)
    assert [p.slice for p in found] == [3, 8]
    assert found[0].probability > found[1].probability


def test_min_probability_and_max_peaks():
    maps = sum(gaussian((10, 32, 32), (z, 5 + 3 * z, 6), 0.8, h) for z, h in ((1, 0.9), (4, 0.6), (7, 0.3)))
    assert [round(p.probability, 1) for p in peaks(maps, min_probability=0.5)] == [0.9, 0.6]
    assert len(peaks(maps, min_probability=0.0, max_peaks=1)) == 1
    assert peaks(np.zeros((3, 8, 8), np.float32), min_probability=0.5) == []
    assert peaks(np.zeros((0, 8, 8), np.float32)) == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='"maps"'):
        peaks(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match='"max_peaks"'):
        peaks(np.zeros((2, 8, 8), np.float32), max_peaks=0)


# --------------------------------------------------------------------------- the second stage's input


def test_patches_are_cut_at_a_fixed_scale_in_mm_on_planes_along_z():
    """A 6 mm bright square seen through two pixel spacings fills the same patch pixels; planes follow z in mm."""
    from node.preprocessing import LUNG_WINDOW, SOFT_TISSUE_WINDOW, prepare_patches

    windows = (LUNG_WINDOW, SOFT_TISSUE_WINDOW)
    seen = []
    for px in (0.5, 1.0):
        n = int(60 / px)
        vol = np.full((5, n, n), -800, np.int16)
        half = int(3 / px)
        vol[2, n // 2 - half : n // 2 + half, n // 2 - half : n // 2 + half] = 40
        vol[3] = 500  # the next slice: calcium density all over
        p = prepare_patches(vol, [(2, n / 2 - 0.5, n / 2 - 0.5)], spacing=(2.5, px, px), size=12, mm_per_pixel=1.0,
                            z_offsets_mm=(-2.5, 0.0, 2.5), windows=windows)
        assert p.shape == (1, 12, 12, 6) and p.dtype == np.float32
        seen.append(p[0])
    a, b = seen
    assert np.allclose(a[..., 3], b[..., 3], atol=0.15)  # the centre plane, soft tissue: same picture at both scales
    assert a[6, 6, 3] == pytest.approx(0.5) and a[0, 0, 3] == 0.0  # 40 HU is the soft window's middle; lung is 0
    assert a[6, 6, 2] == pytest.approx((40 + 1350) / 1500)  # the lung window of the same pixel
    assert np.all(a[..., 5] == 1.0) and np.all(a[..., 0] < 0.4)  # +2.5 mm: slice 3 (calcium); -2.5 mm: lung only


def test_patches_outside_the_image_are_air_and_planes_clamp_at_the_volume_ends():
    from node.preprocessing import LUNG_WINDOW, prepare_patches

    vol = np.full((2, 20, 20), 0, np.int16)
    vol[1] = 100
    p = prepare_patches(vol, [(0, 0.0, 0.0)], spacing=(5.0, 1.0, 1.0), size=8, mm_per_pixel=1.0,
                        z_offsets_mm=(-5.0, 0.0, 5.0), windows=(LUNG_WINDOW,))
    air = (-1000 + 1350) / 1500
    assert p[0, 0, 0, 1] == pytest.approx(air) and p[0, 7, 7, 1] == pytest.approx(1350 / 1500)
    assert np.array_equal(p[0, ..., 0], p[0, ..., 1])  # -5 mm from slice 0: slice 0 again
    assert p[0, 7, 7, 2] == pytest.approx(1450 / 1500)  # +5 mm: slice 1
    with pytest.raises(ValueError, match='"mm_per_pixel"'):
        prepare_patches(vol, [(0, 0, 0)], spacing=(1, 1, 1), size=8, mm_per_pixel=0, z_offsets_mm=(0,), windows=(LUNG_WINDOW,))


def test_rescored_peaks_and_their_slice_scores():
    from node.preprocessing import Peak, rescored, slice_scores_of

    found = [Peak(3, 10.0, 10.0, 0.9), Peak(5, 50.0, 50.0, 0.6), Peak(3, 90.0, 90.0, 0.4)]
    again = rescored(found, [0.1, 0.7, 0.7])
    assert [(p.slice, p.row, p.probability) for p in again] == [(5, 50.0, 0.7), (3, 90.0, 0.7), (3, 10.0, 0.1)]
    scores = slice_scores_of(again, 8)
    assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([0, 0, 0, 0.7, 0, 0.7, 0, 0])
    with pytest.raises(ValueError, match="3 peaks but 2 probabilities"):
        rescored(found, [0.1, 0.2])


def test_a_search_scores_each_candidate_on_its_neighbouring_slices_and_keeps_its_best():
    from node.preprocessing import Peak, best_slices, search_slices

    found = [Peak(0, 10.0, 10.0, 0.9), Peak(5, 50.0, 50.0, 0.6)]
    assert search_slices(found, 6, 2.0, 0.0) == [(0, 0), (1, 5)]  # no search: the candidates as they are
    assert search_slices(found, 6, 2.0, 3.9) == [(0, 0), (0, 1), (1, 5), (1, 4)]  # one slice each way, in the volume
    pairs = search_slices(found, 6, 2.0, 4.0)
    assert pairs == [(0, 0), (0, 1), (0, 2), (1, 5), (1, 4), (1, 3)]
    best = best_slices(found, pairs, [0.2, 0.2, 0.1, 0.3, 0.8, 0.5])
    assert [(p.slice, p.row, round(p.probability, 6)) for p in best] == [(4, 50.0, 0.8), (0, 10.0, 0.2)]
    assert best_slices(found, pairs[:1] + pairs[3:4], [0.4, 0.3])[0].slice == 0  # searched or not, same rule
    with pytest.raises(ValueError, match="6 .* pairs but 5 probabilities"):
        best_slices(found, pairs, [0.1] * 5)
    with pytest.raises(ValueError, match=r"pairs cover candidates \[0\], not all 2"):
        best_slices(found, pairs[:3], [0.1] * 3)


def test_candidates_that_a_search_brings_together_are_one_finding():
    from node.preprocessing import Peak, suppressed

    # one 30 mm nodule seen twice, 15 mm apart along z; the search moved both to its middle slices
    moved = [Peak(6, 100.0, 100.0, 0.9), Peak(7, 101.0, 100.0, 0.8), Peak(7, 140.0, 100.0, 0.7)]
    kept = suppressed(moved, (2.5, 0.5, 0.5), 15.0)
    assert [(p.slice, p.row) for p in kept] == [(6, 100.0), (7, 140.0)]  # 20 mm away in-plane: another place
    assert suppressed(moved, (2.5, 0.5, 0.5), 0.0) == moved
